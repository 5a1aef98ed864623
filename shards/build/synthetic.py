"""A deterministic synthetic corpus with planted topics and a long-tailed topic mix.

Each document is a few English-like sentences built from one topic's vocabulary, so a
sentence model or a bag-of-words embedder can tell topics apart, and clustering quality
can be measured against the planted labels. Topic sizes follow a Zipf-like law (topic 0
is the largest), the shape ClusterClip sampling is meant for. Twenty themes are written
out by hand; topics beyond them blend two themes (a distinct pair per topic), which is
still separable by vocabulary but harder, like real sub-genres.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator

import numpy as np

from croupier.errors import ConfigError

# theme: (nouns, verbs, adjectives)
_THEMES: dict[str, tuple[str, str, str]] = {
    "astronomy": ("telescope galaxy nebula comet orbit planet asteroid star eclipse supernova "
                  "observatory quasar meteor constellation moon",
                  "orbits observes rotates collapses illuminates eclipses drifts",
                  "celestial distant luminous stellar lunar cosmic faint"),
    "cooking": ("recipe skillet garlic onion butter oven sauce dough flour pepper broth "
                "casserole spatula saucepan herbs",
                "simmers bakes chops whisks roasts seasons marinates",
                "crispy savory tender golden spicy creamy fragrant"),
    "law": ("court judge statute plaintiff defendant verdict appeal contract attorney "
            "jury testimony lawsuit precedent tribunal clause",
            "rules appeals testifies litigates overturns sues adjudicates",
            "legal binding judicial constitutional contractual liable statutory"),
    "football": ("striker goalkeeper midfielder penalty referee stadium league tackle "
                 "corner header defender coach match trophy pitch",
                 "scores dribbles passes defends shoots tackles equalizes",
                 "offside decisive aggressive tactical injured unbeaten relegated"),
    "chemistry": ("molecule reagent catalyst solvent titration isotope electron compound "
                  "beaker precipitate oxidation polymer acid enzyme crystal",
                  "reacts dissolves oxidizes catalyzes distills titrates precipitates",
                  "volatile organic covalent acidic aqueous molar inert"),
    "music": ("melody chord orchestra violin rhythm symphony guitar tempo concerto piano "
              "chorus harmony drummer album soprano",
              "composes rehearses performs strums improvises harmonizes conducts",
              "melodic acoustic orchestral rhythmic harmonic lyrical upbeat"),
    "medicine": ("patient diagnosis vaccine surgeon symptom clinic therapy antibiotic "
                 "dosage infection nurse tumor prescription fracture pulse",
                 "diagnoses prescribes treats operates heals vaccinates monitors",
                 "clinical chronic acute surgical viral benign cardiac"),
    "finance": ("investor dividend portfolio bond equity inflation interest mortgage "
                "hedge broker liquidity revenue ledger auditor securities",
                "invests hedges trades audits borrows diversifies underwrites",
                "fiscal monetary bullish bearish solvent lucrative volatile"),
    "computing": ("compiler database server algorithm kernel processor software network "
                  "cache thread debugger repository encryption bandwidth protocol",
                  "compiles executes debugs encrypts caches deploys refactors",
                  "binary parallel concurrent scalable distributed recursive encrypted"),
    "gardening": ("seedling compost tulip hedge greenhouse fertilizer soil orchard "
                  "pruning shears mulch trellis perennial bulb weeds",
                  "plants prunes waters sprouts blooms fertilizes harvests",
                  "leafy perennial fertile shady flowering organic lush"),
    "history": ("empire dynasty monarch treaty revolution parliament manuscript archive "
                "crusade pharaoh chronicle emperor colony rebellion siege",
                "conquers abdicates reigns rebels annexes chronicles colonizes",
                "medieval ancient imperial colonial feudal dynastic victorian"),
    "travel": ("passport itinerary airport luggage hostel ferry tourist souvenir visa "
               "backpack destination railway cruise guidebook boarding",
               "travels explores books departs sightsees backpacks navigates",
               "scenic exotic remote touristy overnight coastal budget"),
    "weather": ("thunderstorm humidity forecast drizzle blizzard hurricane barometer "
                "tornado monsoon frost rainfall cloudburst gust heatwave hail",
                "forecasts pours freezes thaws gusts drizzles swirls",
                "humid stormy chilly foggy overcast tropical arid"),
    "ocean": ("coral reef dolphin whale tide plankton lagoon seabed octopus kelp "
              "shipwreck current jellyfish submarine shoreline",
              "swims dives drifts migrates surfaces spawns ebbs",
              "marine salty tidal underwater abyssal coastal briny"),
    "architecture": ("facade cathedral column arch blueprint skyscraper dome balcony "
                     "atrium staircase masonry gable cornice courtyard pillar",
                     "designs renovates restores constructs vaults drafts cantilevers",
                     "gothic baroque modernist ornate structural brutalist symmetrical"),
    "film": ("director screenplay actor camera premiere sequel audience cinematographer "
             "studio trailer montage protagonist soundtrack festival box",
             "directs films edits casts screens premieres narrates",
             "cinematic dramatic animated documentary blockbuster indie noir"),
    "farming": ("tractor harvest barley cattle barn irrigation pasture plough silo "
                "livestock wheat fodder dairy sheep acreage",
                "ploughs harvests grazes irrigates milks sows reaps",
                "rural agricultural arable pastoral seasonal fertile drought"),
    "geology": ("volcano magma granite fossil sediment tectonic quartz canyon glacier "
                "basalt erosion fault mineral bedrock stratum",
                "erupts erodes weathers fractures deposits uplifts subducts",
                "igneous sedimentary volcanic metamorphic seismic crystalline porous"),
    "aviation": ("pilot cockpit runway turbine fuselage altitude hangar propeller "
                 "airliner autopilot glider jetliner aileron landing control",
                 "flies lands takes taxis climbs descends banks",
                 "aerial supersonic airborne aeronautical turbulent commercial vertical"),
    "chess": ("bishop knight rook pawn checkmate gambit opening endgame grandmaster "
              "castling stalemate tournament queen board sacrifice",
              "castles captures checks promotes resigns sacrifices forks",
              "positional tactical opening endgame decisive blitz grandmaster"),
}

_FILLER_SUBJECTS = ("the", "every", "one", "this", "that", "our", "their", "a")
_TEMPLATES = (
    "{D} {a} {n} {v} {d} {n2}.",
    "{D} {n} {v} near {d} {a2} {n2}.",
    "Yesterday {d} {a} {n} {v} while {d} {n2} waited.",
    "Experts say {d} {n} often {v} {d} {a2} {n2}.",
    "When {d} {n} {v}, {d} {n2} becomes {a}.",
    "{D} {a} {n} and {d} {n2} are {a2}.",
    "Nobody expected {d} {n} to be so {a}.",
    "In the report, {d} {n} {v} beside {d} {n2}.",
)

MAX_TOPICS = len(_THEMES) + len(_THEMES) * (len(_THEMES) - 1) // 2


def theme_names() -> list[str]:
    return list(_THEMES)


def _topic_vocab(topic: int) -> tuple[list[str], list[str], list[str]]:
    themes = list(_THEMES.values())
    if topic < len(themes):
        mix = [themes[topic]]
    else:
        a, b = list(itertools.combinations(range(len(themes)), 2))[topic - len(themes)]
        mix = [themes[a], themes[b]]
    nouns = sorted({w for t in mix for w in t[0].split()})
    verbs = sorted({w for t in mix for w in t[1].split()})
    adjs = sorted({w for t in mix for w in t[2].split()})
    return nouns, verbs, adjs


def topic_weights(num_topics: int, alpha: float = 1.1) -> np.ndarray:
    """Zipf-like topic probabilities: p(t) proportional to 1 / (t + 1) ** alpha."""
    if num_topics < 1 or num_topics > MAX_TOPICS:
        raise ConfigError(f"num_topics must lie in [1, {MAX_TOPICS}], got {num_topics}")
    if alpha < 0:
        raise ConfigError(f"alpha must be >= 0, got {alpha}")
    w = 1.0 / np.arange(1, num_topics + 1, dtype=np.float64) ** alpha
    return w / w.sum()


def iter_corpus(num_docs: int, num_topics: int, *, alpha: float = 1.1, seed: int = 0,
                min_sentences: int = 2, max_sentences: int = 5) -> Iterator[dict]:
    """Yield `num_docs` documents {"text", "topic"}; same arguments, same documents."""
    if num_docs < 0:
        raise ConfigError(f"num_docs must be >= 0, got {num_docs}")
    if not 1 <= min_sentences <= max_sentences:
        raise ConfigError(f"need 1 <= min_sentences <= max_sentences, got {min_sentences}, {max_sentences}")
    probs = topic_weights(num_topics, alpha)
    vocab = [_topic_vocab(t) for t in range(num_topics)]
    rng = np.random.default_rng(np.random.SeedSequence([seed, num_topics, 0x5EED]))
    topics = rng.choice(num_topics, size=num_docs, p=probs)
    for topic in topics:
        nouns, verbs, adjs = vocab[int(topic)]
        sentences = []
        for _ in range(int(rng.integers(min_sentences, max_sentences + 1))):
            tpl = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
            d = _FILLER_SUBJECTS[int(rng.integers(len(_FILLER_SUBJECTS)))]
            s = tpl.format(
                D=d.capitalize(), d=d,
                n=nouns[int(rng.integers(len(nouns)))], n2=nouns[int(rng.integers(len(nouns)))],
                v=verbs[int(rng.integers(len(verbs)))],
                a=adjs[int(rng.integers(len(adjs)))], a2=adjs[int(rng.integers(len(adjs)))],
            )
            sentences.append(s[0].upper() + s[1:])
        yield {"text": " ".join(sentences), "topic": int(topic)}


def generate_corpus(num_docs: int, num_topics: int, *, alpha: float = 1.1, seed: int = 0) -> list[dict]:
    """The whole corpus as a list (see `iter_corpus` for large corpora)."""
    return list(iter_corpus(num_docs, num_topics, alpha=alpha, seed=seed))


def write_jsonl(path: str | os.PathLike[str], docs: Iterable[dict]) -> int:
    """Write documents as JSON lines (gzip when the name ends in .gz); returns the count."""
    path = os.fspath(path)
    if path.endswith(".gz"):
        import gzip
        f = gzip.open(path, "wt", encoding="utf-8")
    else:
        f = open(path, "w", encoding="utf-8")
    n = 0
    with f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            n += 1
    return n
