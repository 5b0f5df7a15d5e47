"""`edgemoe bench --resident`: stores with other resident weights than int8 get their own
directory names (int8 keeps the names existing work directories have)."""

from __future__ import annotations

from edgemoe_lab.peer import configs as C
from edgemoe_lab.peer import model


def test_resident_kind_names_the_store(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(model, "ensure_store", lambda work, hf, name, flags, log: calls.append((name, flags)) or
                        work / name)
    hf, plan = tmp_path / "hf-x", tmp_path / "plan.json"
    assert model.resident_tag(["--resident", "int8"]) == ""
    assert model.resident_tag(["--resident", "int4"]) == "-resint4"
    assert model.resident_tag(["--resident", "float"]) == "-resfloat"
    assert model.plan_store(tmp_path, hf, "plan", plan, ["--resident", "int8"], print).name == "edgemoe-plan-hf-x"
    assert model.plan_store(tmp_path, hf, "plan", plan, ["--resident", "int4"], print).name == \
        "edgemoe-plan-resint4-hf-x"
    assert model.plan_store(tmp_path, hf, "plan-fallback", plan, ["--resident", "int4"], print).name == \
        f"edgemoe-plan-fb{C.FALLBACK_BITS}-resint4-hf-x"
    assert calls[1][1][-2:] == ["--resident", "int4"]
