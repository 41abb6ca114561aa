"""kp-boot of a saved or warm VM: it resumes with its saved hardware, so a share it lacks is refused."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from kodepipe.core.errors import KpError
from kodepipe.core.state import Store
from kodepipe.vm import lifecycle as runtime
from kodepipe.vm import qemu, vms
from tests.conftest import make_image


def test_a_warm_clone_refuses_a_share_it_cannot_have(tmp_path: Path) -> None:
    """A saved machine resumes with its saved hardware: --share must fail loudly, not be dropped."""
    make_image("base")
    store = Store()
    vms.clone(store, "base", "warmish")
    folder = store.folder("vm", "warmish")
    meta = orjson.loads((folder / "meta.json").read_bytes())
    meta["saved"] = {"saved": "2026-01-01T00:00:00Z", "memory": "1G", "cpus": 2, "net": "user", "share": None,
                     "warm": True}
    (folder / "meta.json").write_bytes(orjson.dumps(meta))
    opts = qemu.BootOptions(memory="1G", cpus=2, accel="tcg", net="user", share=tmp_path)
    with pytest.raises(KpError, match="warm clone") as info:
        runtime.boot(store, "warmish", opts, ("tcg", "test"))
    assert info.value.code == "share_on_saved" and "--cold" in (info.value.hint or "")
