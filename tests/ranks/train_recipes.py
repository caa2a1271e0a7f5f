"""Run on N ranks by tests/test_methods_sharded.py: train several recipes one after another in one
process group, each exactly as ``dsft train`` would (a ``Trainer`` per run), because starting a
process (torch, DeepSpeed and transformers imports, the process group) costs more than a tiny run.

argv: <out_dir> <spec.json>, the spec a list of {"recipe", "overrides", "output_dir"}. A run that
raises writes its traceback to <output_dir>/error.txt and the next run starts (an error that
only one rank raises leaves the other waiting in a collective: the caller's timeout ends it).
Writes <out_dir>/rank<N>.json: the output directories whose run failed.
"""
import gc
import json
import sys
import traceback
from pathlib import Path

from dsft import dist
from dsft.recipe import load_recipe
from dsft.train import Trainer

out_dir, spec = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
failed = []
for run in spec:
    try:
        Trainer(load_recipe(run["recipe"], [*run["overrides"],
                                            f"train.output_dir={run['output_dir']}"])).fit()
    except Exception:  # noqa: BLE001 - recorded for the test that reads this run
        Path(run["output_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(run["output_dir"]) / "error.txt").write_text(traceback.format_exc())
        failed.append(run["output_dir"])
    gc.collect()  # the finished run's engine (and, under ZeRO-3, its HfDeepSpeedConfig) goes
(out_dir / f"rank{dist.rank()}.json").write_text(json.dumps({"failed": failed}))
dist.close()
