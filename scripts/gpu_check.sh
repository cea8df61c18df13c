#!/usr/bin/env bash
# GPU check, for a machine with CUDA: the test suite (tests/test_devices.py adds its CUDA cases when CUDA is
# available), then `bench` on CUDA in float32 / bfloat16 / float16 at the default and alit_small sizes, then the
# fixed-budget rollout's host syncs and time per iteration (scripts/host_syncs.py).
# Writes a JSON report (default gpu_report.json): GPU name, torch/CUDA versions, the pytest outcome, one bench
# summary per size and dtype. Run from the repository root in an environment where `pip install ".[test]"` was
# done with a CUDA build of torch. Not yet run: the project's machines have no GPU.
#   usage: scripts/gpu_check.sh [REPORT.json]
set -uo pipefail
cd "$(dirname "$0")/.."
report="${1:-gpu_report.json}"
work="$(mktemp -d)"
python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check: CUDA is not available")' || exit 2

python -m pytest -q -p no:cacheprovider --junitxml="$work/junit.xml" 2>&1 | tee "$work/pytest.log"
pytest_status=${PIPESTATUS[0]}

for size in default alit_small; do
  for dtype in float32 bfloat16 float16; do
    python -m adaptive_tokenizer bench --size "$size" --device cuda --dtype "$dtype" --repeats 3 \
      > "$work/bench_${size}_${dtype}.log" 2>&1
    echo $? > "$work/bench_${size}_${dtype}.status"
  done
done

python scripts/host_syncs.py --device cuda > "$work/host_syncs.log" 2>&1
echo $? > "$work/host_syncs.status"

python - "$work" "$report" "$pytest_status" <<'PY'
import json, pathlib, sys, torch
work, report, pytest_status = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
bench = {}
for log in sorted(work.glob("bench_*.log")):
    lines = log.read_text().strip().splitlines()
    status = int((work / (log.stem + ".status")).read_text())
    try:
        summary = json.loads(lines[-1]) if status == 0 and lines else None
    except json.JSONDecodeError:
        summary = None
    bench[log.stem[len("bench_"):]] = {"status": status, "summary": summary,
                                       "log_tail": None if summary is not None else lines[-20:]}
pytest_tail = (work / "pytest.log").read_text().strip().splitlines()[-3:]
syncs_lines = (work / "host_syncs.log").read_text().strip().splitlines()
syncs_status = int((work / "host_syncs.status").read_text())
try:
    host_syncs = json.loads(syncs_lines[-1]) if syncs_status == 0 and syncs_lines else {"log_tail": syncs_lines[-20:]}
except json.JSONDecodeError:
    host_syncs = {"log_tail": syncs_lines[-20:]}
result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
          "pytest": {"status": pytest_status, "summary": pytest_tail}, "bench": bench,
          "host_syncs": host_syncs}
pathlib.Path(report).write_text(json.dumps(result, indent=2) + "\n")
failed = pytest_status != 0 or any(b["status"] != 0 for b in bench.values())
print(f"wrote {report}; {'FAILED' if failed else 'all passed'}")
sys.exit(1 if failed else 0)
PY
