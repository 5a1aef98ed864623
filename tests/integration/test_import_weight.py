"""Import weight, measured in a fresh interpreter: the client imports nothing of the writer side and the
format package stays light."""

from __future__ import annotations

import subprocess
import sys


def test_client_imports_nothing_of_the_writer_side():
    code = ("import sys, croupier.client, croupier.client.readers.shard_cache, croupier.client.dataset, "
            "croupier.client.cli.dump_cli; "
            "print('\\n'.join(m for m in sys.modules if m.startswith('croupier.shards')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == []


def test_the_format_package_stays_light():
    code = ("import sys, croupier.format, croupier.format.mds_shard, croupier.format.sidecar_layout; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'grpc', 'torch', 'faiss', 'streaming', 'transformers'})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == []
