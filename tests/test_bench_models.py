"""fxopt bench models: one smoke run on tiny configs, every model and system accounted for."""
import json

from fxopt.bench import models
from fxopt.bench.model_specs import SPECS
from fxopt.bench.peers import SYSTEMS


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
            else:
                assert row["status"] == "failed" and row["error"], where
        fx = result["systems"]["fxopt"]
        assert fx["status"] == "ok", (result["model"], fx.get("error"))
        assert fx["cosine"] >= 0.99, (result["model"], fx["cosine"])
        assert fx["optimize_s"] > 0
    assert (tmp_path / "models_small.png").stat().st_size > 0
