"""fxopt bench models: one smoke run on tiny configs, every model and system accounted for."""
import json

import pytest

from fxopt.bench import models
from fxopt.bench.model_specs import SPECS
from fxopt.bench.systems import SYSTEMS


@pytest.mark.slow
def test_small_run_reports_every_system_of_every_model(tmp_path):
    assert models.main(["--small", "--repeats", "2", "--warmup", "1", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "models_small.json").read_text())
    assert doc["complete"] and doc["info"]["threads"]["torch"] == 2
    assert [r["model"] for r in doc["results"]] == list(SPECS)
    for result in doc["results"]:
        assert set(result["systems"]) == set(SYSTEMS), result["model"]
        for name, row in result["systems"].items():
            where = f"{result['model']}/{name}"
            if row["status"] == "ok":
                assert row["median_ms"] > 0 and len(row["samples_ms"]) == 2, where
                assert len(row["round_medians_ms"]) == 2, where
            else:
                assert row["status"] == "failed" and row["error"], where
        for peer in ("ort_static_int8", "ov_default", "ov_int8"):   # the strong peers must really run
            row = result["systems"][peer]
            assert row["status"] == "ok", (result["model"], peer, row.get("error"))
            assert row["cosine"] >= 0.99, (result["model"], peer, row["cosine"])
        fx = result["systems"]["fxopt"]
        assert fx["status"] == "ok", (result["model"], fx.get("error"))
        assert fx["cosine"] >= 0.99, (result["model"], fx["cosine"])
        assert fx["optimize_s"] > 0
        assert result["torch_fp32_drift"]["first_round_ms"] > 0
    assert (tmp_path / "models_small.png").stat().st_size > 0


def test_systems_are_timed_in_turns_and_a_failure_mid_run_is_reported():
    calls = []

    class Prepared:
        def __init__(self, name, fail_at=None):
            self.name, self.fail_at, self.count = name, fail_at, 0

        def fn(self):
            self.count += 1
            if self.count == self.fail_at:
                raise RuntimeError("out of memory")
            calls.append(self.name)

    results = {n: {"status": "ok"} for n in "abc"}
    models.time_in_turns({"a": Prepared("a"), "b": Prepared("b"), "c": Prepared("c", fail_at=5)}, results, 7)
    # 5 rounds, 2+2+1+1+1 timed calls, each turn after one untimed call; c fails in round 2
    assert calls[:12] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["a"] * 3
    assert calls.count("a") == calls.count("b") == 7 + 5 and calls.count("c") == 4
    assert len(results["a"]["samples_ms"]) == 7 and len(results["a"]["round_medians_ms"]) == 5
    assert results["c"]["status"] == "failed" and "out of memory" in results["c"]["error"]
