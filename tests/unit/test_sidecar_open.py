"""Opening a sidecar reads first and diagnoses on failure (fewer file system calls per source
of a mixture): every refusal still names what is wrong, and the offsets are read whole."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from croupier.errors import DatasetError
from croupier.format.sidecar import Sidecar


@pytest.mark.parametrize("layout", ["cluster-major", "original"])
def test_open_refuses_each_missing_piece_by_name(build_dataset, tmp_path, layout):
    d = build_dataset(tmp_path, layout=layout)
    side = Sidecar.open(d)
    offsets = side.offsets()
    assert type(offsets) is np.ndarray and offsets.dtype == np.int64  # in memory, not a mapping
    assert int(offsets[-1]) == side.num_samples == int(side.sizes.sum())
    np.testing.assert_array_equal(offsets, np.load(d / "croupier" / side.manifest["files"]["offsets"]))
    roles = ["offsets", "assignments"] + (["members"] if layout == "original" else [])
    for role in roles:
        name = side.manifest["files"][role]
        os.rename(d / "croupier" / name, tmp_path / "aside")
        with pytest.raises(DatasetError, match=f"sidecar file .*{name}' is missing"):
            Sidecar.open(d)
        os.rename(tmp_path / "aside", d / "croupier" / name)
    (d / "index.json").rename(tmp_path / "index.json")
    with pytest.raises(DatasetError, match="holds no MDS index.json: not an MDS dataset"):
        Sidecar.open(d)
    (d / "index.json").mkdir()  # a folder where the index should be
    with pytest.raises(DatasetError, match="holds no MDS index.json"):
        Sidecar.open(d)
    (d / "index.json").rmdir()
    shutil.move(tmp_path / "index.json", d / "index.json")
    with pytest.raises(DatasetError, match="does not exist"):
        Sidecar.open(d / "nowhere")
    shutil.rmtree(d / "croupier")
    with pytest.raises(DatasetError, match=r"has no cluster sidecar \(croupier/manifest.json missing\)"):
        Sidecar.open(d)
    (d / "croupier").write_text("not a folder")
    with pytest.raises(DatasetError, match="has no cluster sidecar"):
        Sidecar.open(d)


def test_a_cluster_major_layout_takes_its_offsets_from_the_manifest_when_they_hash_right(build_dataset, tmp_path):
    d = build_dataset(tmp_path)
    side = Sidecar.open(d)
    want = side.offsets()
    offsets_file = d / "croupier" / side.manifest["files"]["offsets"]
    offsets_file.unlink()  # gone after the open: the layout does not need it
    layout = side.layout()
    np.testing.assert_array_equal(layout.offsets, want)
    assert layout.fingerprint == f"{side.fingerprint}+clu:{side.clustering_hash}"
    np.save(offsets_file, want)
    side.manifest["sizes"] = [int(x) for x in reversed(side.sizes)]  # sizes the clustering hash does not name
    np.testing.assert_array_equal(side.layout().offsets, want)  # the file's offsets, as before
    side.manifest["sizes"] = "garbage"
    np.testing.assert_array_equal(side.layout().offsets, want)
