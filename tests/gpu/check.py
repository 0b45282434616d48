"""The GPU check: distconv's CUDA paths on a machine with one or more NVIDIA GPUs.

    bash tests/gpu/check.sh [--cpu-dry-run] [--fixtures DIR]      (from the repository root)

check.sh makes megatron-core importable (from ``.whl/``, see fetch_wheels.sh) and runs this
driver, which adapts to the GPUs it finds:

1. builds small fixtures (llama, mixtral, deepseek_v3 at TP1PP1, TP2PP2 / EP2) on the CPU with
   CUDA hidden, as the test suite does;
2. exports each at world 1 with ``--device cuda``: transformers' logits against megatron-core's
   recorded ones (fp32, <= 1e-4), every safetensors file byte-identical to the same export
   with ``--device cpu``, the run report showing the rank worked on CUDA, and (Llama, Mixtral)
   ``distconv verify --device cuda`` of it agreeing with ``--device cpu``;
3. the post-training hook in a one-rank NCCL job (tests/gpu/hook_job.py): one export that
   succeeds, one that fails on purpose, then the caller's NCCL group must still all_reduce;
4. ``python -m distconv import`` with CUDA visible: how many CUDA contexts it opens, measured
   with nvidia-smi (calibrated first) and inside the process (tests/gpu/import_probe.py);
4b. NCCL on one GPU (tests/gpu/loopback.py), once under a gloo default group (a plain process)
   and once under an NCCL one (torchrun, as a training job): 200 rounds of varied messages sent
   to itself through distconv's ``_pack``, ``batch_isend_irecv``, ``Comm.wait``, the pinned
   staging and ``_unpack``, bit-exact; the staging unpinned by ``clear()``; ``Comm.setup`` in
   the existing group keeping the peak-memory statistics; and a stalled receive that
   ``Comm.wait`` ends within its deadline, whose group ``Comm.close`` aborts (the device then
   synchronizes, and under gloo the process outlives NCCL's watchdog for that group);
5. with two GPUs or more: world 2 (and 4) over NCCL, ``--writers 2``, a rank killed mid-run
   with ``--timeout 60``, and more ranks than GPUs with ``--device auto`` (gloo, a warning);
6. an ``fsdp_dtensor`` save written by Megatron-FSDP itself (tests/gpu/fsdp_save.py, on up to
   two GPUs, the Llama and Mixtral fixtures): exported on the CPU, transformers' logits against
   megatron-core's; its DCP metadata (keys, shapes, dtypes, stored chunks) and its export's bytes
   equal to those of the suite's CPU emulation at the same data parallelism
   (tests/fixtures/fsdp_dtensor.py), which proves the emulation.

Every check prints one line, ``PASS name details``, ``FAIL name details`` or ``SKIP name why``;
the exit status is 1 if any FAIL. The summary (summary.txt) and one log per command (logs/)
go under ``$OUT`` when it is set, else under a new temporary folder.

``--cpu-dry-run`` runs the same steps with ``--device cpu`` (gloo) and CUDA hidden, to prove the
plumbing on a machine without GPUs; the GPU-only assertions then print SKIP. The driver itself
never touches CUDA (it hides the GPUs from itself; logits are computed on the CPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BASE_ENV = dict(os.environ)  # what the children get (GPUs visible unless a dry run)
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # this driver never opens a CUDA context

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
TOL = 1e-4
FIXTURES = ("llama", "mixtral", "deepseek_v3")
LAYOUTS = ("2x2", "1x1x2")  # build.py keeps 1x1 (the reference) too
FSDP_FIXTURES = ("llama", "mixtral")  # saved by Megatron-FSDP itself: SwiGLU dense, SwiGLU experts
W1_CASES = (("llama", "tp2pp2"), ("mixtral", "tp1pp1ep2"), ("deepseek_v3", "tp1pp1ep2"))
DENSE = ("llama", "tp2pp2")  # what the multi-rank checks export
SLOW = ["--window", "1KB", "--max-shard-size", "20KB"]  # many small groups and files: a kill lands mid-run
VERIFY_MODELS = ("llama", "mixtral")  # verify --device cuda against --device cpu: dense, and MoE experts windowed
VERIFY_SAME = 1e-5  # verify's max |diff| on the GPU against the CPU's: the same numbers up to kernel order
KILL_TIMEOUT_S = 60
KILL_EXIT_WITHIN_S = 90
LOOPBACK_ROUNDS = 200
WATCHDOG_WAIT_S = 70  # past the stalled group's NCCL timeout (4 s deadline + 60 s margin)


class Failed(Exception):
    """A check's assertion: becomes one FAIL line."""


class Skipped(Exception):
    """A check that cannot run here: becomes one SKIP line."""


class Check:
    def __init__(self, out: Path, dry: bool, fixtures: Path | None):
        self.out, self.dry = out, dry
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work = out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.summary = out / "summary.txt"
        self.summary.write_text("")
        self.results: list[tuple[str, str, str]] = []
        self.reuse = fixtures
        self.fx = fixtures if fixtures is not None else self.work / "fixtures"
        self.fixtures_ok = False
        self.device = "cpu" if dry else "cuda"
        self.gpus = 0
        self.cpu_exports: dict[tuple[str, str], Path] = {}

    # ---- bookkeeping -------------------------------------------------------------------
    def record(self, status: str, name: str, details: str) -> None:
        line = f"{status} {name} {details}".rstrip()
        self.results.append((status, name, details))
        print(line, flush=True)
        with self.summary.open("a") as f:
            f.write(line + "\n")

    def step(self, name: str, fn, *args) -> None:
        """Run one check; its exceptions become FAIL/SKIP lines, never a crash of the driver."""
        try:
            details = fn(*args)
        except Skipped as e:
            self.record("SKIP", name, str(e))
        except Failed as e:
            self.record("FAIL", name, str(e))
        except Exception as e:  # a bug or an unexpected state: a FAIL with its traceback in the log
            log = self.logs / f"{_slug(name)}.driver-error.log"
            log.write_text(traceback.format_exc())
            self.record("FAIL", name, f"{type(e).__name__}: {e} (traceback: {log})")
        else:
            self.record("PASS", name, details)

    def env(self, cuda: bool = True) -> dict[str, str]:
        env = dict(BASE_ENV)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), BASE_ENV.get("PYTHONPATH", "")) if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONWARNINGS"] = "ignore"
        if self.dry or not cuda:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def run(self, name: str, cmd: list[str], timeout: float, cuda: bool = True) -> subprocess.CompletedProcess:
        """Run a command in its own session (so a timeout ends all of it); log everything."""
        log = self.logs / f"{_slug(name)}.log"
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(cuda), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_session(proc)
            stdout, stderr = proc.communicate()
            _write_log(log, cmd, None, time.monotonic() - start, stdout, stderr)
            raise Failed(f"timed out after {timeout:.0f} s: {' '.join(cmd[2:])} (log {log})")
        _write_log(log, cmd, proc.returncode, time.monotonic() - start, stdout, stderr)
        return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)

    def torchrun(self, nproc: int, *args: str) -> list[str]:
        return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]

    def need_fixtures(self) -> None:
        if not self.fixtures_ok:
            raise Skipped("the fixtures were not built (see build-fixtures)")

    def export(self, name: str, tag: str, model: str, layout: str, device: str, nproc: int = 1,
               extra: tuple[str, ...] = (), timeout: float = 300) -> tuple[Path, dict]:
        """One CLI export into work/exports/TAG; returns the folder and its --report."""
        self.need_fixtures()
        save = self.work / "exports" / tag
        report = self.work / "exports" / f"{tag}.report.json"
        args = ["-m", "distconv", "export", "--load", str(self.fx / model / layout), "--save", str(save),
                "--device", device, "--report", str(report), "--overwrite", *extra]
        cmd = [PY, *args] if nproc == 1 else self.torchrun(nproc, *args)
        proc = self.run(name, cmd, timeout)
        if proc.returncode != 0:
            raise Failed(f"export exited {proc.returncode}: {_last_error(proc.stderr)} (log {self.logs / _slug(name)}.log)")
        return save, json.loads(report.read_text())

    # ---- 1. fixtures -------------------------------------------------------------------
    def build(self) -> str:
        wanted = [self.fx / "refs" / f"{m}.pt" for m in FIXTURES] + [self.fx / m / l for m, l in W1_CASES]
        if self.reuse is not None:
            missing = [str(p) for p in wanted if not p.exists()]
            if missing:
                raise Failed(f"--fixtures {self.reuse} lacks {', '.join(missing[:4])}")
            self.fixtures_ok = True
            raise Skipped(f"not built: reusing --fixtures {self.reuse} (all {len(wanted)} needed paths present)")
        start = time.monotonic()
        cmd = self.torchrun(4, "-m", "tests.fixtures.build", "--out", str(self.fx), "--only", *FIXTURES,
                            "--layouts", *LAYOUTS)
        proc = self.run("build-fixtures", cmd, timeout=420, cuda=False)
        if proc.returncode != 0:
            raise Failed(f"build exited {proc.returncode}: {_last_error(proc.stderr)}")
        missing = [str(p) for p in wanted if not p.exists()]
        if missing:
            raise Failed(f"built, but {', '.join(missing)} missing")
        self.fixtures_ok = True
        return f"{', '.join(FIXTURES)} at TP1PP1 + {' '.join(LAYOUTS)} on the CPU (CUDA hidden, 4 gloo ranks) in {time.monotonic() - start:.0f} s"

    # ---- 2. world 1 --------------------------------------------------------------------
    def world1(self, model: str, layout: str) -> None:
        key = f"{model}-{layout}"
        label = "--device cpu (dry run)" if self.dry else "--device cuda"
        state: dict = {}

        def main_export() -> str:
            start = time.monotonic()
            state["dev"], state["report"] = self.export(f"w1-{key}-{self.device}", f"{key}_w1_{self.device}_main",
                                                        model, layout, self.device)
            took = time.monotonic() - start
            diff = logits_diff(self.fx, model, state["dev"])
            if not diff <= TOL:
                raise Failed(f"{label}: max |logits - megatron-core| {diff:.3e} > {TOL:g}")
            return f"{label}, 1 rank: max |logits - megatron-core| {diff:.2e} <= {TOL:g} ({took:.1f} s)"

        def identical() -> str:
            self.need_fixtures()
            cpu, _ = self.export(f"w1-{key}-cpu", f"{key}_w1_cpu", model, layout, "cpu")
            self.cpu_exports[(model, layout)] = cpu  # the multi-rank checks compare with it too
            if "dev" not in state:
                raise Skipped(f"the {label} export above failed (the --device cpu export ran)")
            files = same_safetensors(state["dev"], cpu)
            return f"{files} safetensors file(s) byte-identical, {label} vs --device cpu"

        def report() -> str:
            if self.dry:
                raise Skipped("dry run: no CUDA, nothing to show in the report")
            if "report" not in state:
                raise Skipped("the export above failed")
            ranks = state["report"].get("ranks", [])
            peaks = [r.get("peak_cuda_bytes") for r in ranks]
            if not ranks or any(p is None for p in peaks):
                raise Failed(f"the --report has no peak_cuda_bytes for every rank (ranks: {ranks})")
            return (f"--report: peak_cuda_bytes {peaks} on {len(ranks)} rank(s) (present only when the rank "
                    "initialised CUDA; 0 means no tensor went through GPU memory: at world 1 nothing is sent)")

        def verify() -> str:
            if "dev" not in state:
                raise Skipped("the export above failed")
            results = []
            for tag, device in (("first", self.device), ("cpu", "cpu")):  # the dry run: cpu twice
                proc = self.run(f"verify-w1-{key}-{tag}", [PY, "-m", "distconv", "verify", "--load",
                                                          str(self.fx / model / layout), "--hf", str(state["dev"]),
                                                          "--device", device, "--json"], timeout=300,
                                cuda=tag == "first")  # the reference as the suite runs it: CUDA hidden
                if proc.returncode not in (0, 1) or not proc.stdout.strip():
                    raise Failed(f"verify --device {device} exited {proc.returncode}: {_last_error(proc.stderr)}")
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            ours, cpu = results
            if not (ours["ok"] and cpu["ok"]):
                raise Failed(f"verify not ok: --device {self.device} {ours['max_abs_diff']:.3e}, "
                             f"cpu {cpu['max_abs_diff']:.3e}")
            if abs(ours["max_abs_diff"] - cpu["max_abs_diff"]) > VERIFY_SAME:
                raise Failed(f"verify --device {self.device}'s max |diff| {ours['max_abs_diff']:.3e} is not --device "
                             f"cpu's {cpu['max_abs_diff']:.3e} (within {VERIFY_SAME:g})")
            return (f"verify --device {self.device}: max |diff| {ours['max_abs_diff']:.2e} over "
                    f"{len(ours['layers'])} layers, --device cpu {cpu['max_abs_diff']:.2e}")

        self.step(f"export-w1 {key}", main_export)
        self.step(f"identical-w1 {key}", identical)
        self.step(f"cuda-report-w1 {key}", report)
        if model in VERIFY_MODELS:
            self.step(f"verify-w1 {key}", verify)

    # ---- 3. the hook in a one-rank NCCL job --------------------------------------------
    def hook(self) -> str:
        self.need_fixtures()
        backend = "gloo" if self.dry else "nccl"
        out = self.work / "hook"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        model, layout = DENSE
        cmd = self.torchrun(1, str(ROOT / "tests" / "gpu" / "hook_job.py"), str(self.fx / model / layout), str(out), backend)
        proc = self.run(f"hook-{backend}", cmd, timeout=300)
        result_file = out / "rank0.json"
        if not result_file.exists():
            raise Failed(f"the job exited {proc.returncode} without its result: {_last_error(proc.stderr)} "
                         f"(log {self.logs / _slug('hook-' + backend)}.log)")
        r = json.loads(result_file.read_text())
        problems = []
        if proc.returncode != 0:
            problems.append(f"the job exited {proc.returncode}")
        if not r["first"].get("ok"):
            problems.append(f"the first export failed: {r['first'].get('error')}")
        if r["second"].get("raised") != "DistconvError":
            problems.append(f"the failing export raised {r['second'].get('raised')}: {r['second'].get('error')}")
        if r["all_reduce"] != r["expected"]:
            problems.append(f"all_reduce after the exports gave {r['all_reduce']}, expected {r['expected']}")
        if not (r["group_after_first"] and r["group_after_second"]):
            problems.append("the caller's default group was destroyed by export()")
        if backend == "nccl" and r.get("tensor_device", "").split(":")[0] != "cuda":
            problems.append(f"the all_reduce tensor was on {r.get('tensor_device')}")
        from distconv.engine import marker
        from distconv.hf import sink as hf_sink

        if r["first"].get("ok") and not marker.finished(out / "ok", hf_sink.complete):
            problems.append("the first export's folder is not a finished export")
        if (out / "bad").exists():
            problems.append("the failing export left its --save folder")
        if problems:
            raise Failed("; ".join(problems))
        diff = logits_diff(self.fx, model, out / "ok")
        if not diff <= TOL:
            raise Failed(f"the hook's export: max |logits - megatron-core| {diff:.3e} > {TOL:g}")
        peak = r["first"].get("peak_cuda_bytes")
        return (f"1-rank {backend} job: export ok (logits {diff:.2e}, peak_cuda_bytes {peak}), failing export raised "
                f"DistconvError ({r['second']['error'][:80]!r}), then all_reduce on {r['tensor_device']} = "
                f"{r['all_reduce']}, destroy_process_group, exit 0")

    # ---- 4b. NCCL on one GPU: the loopback and the stalled teardown ---------------------
    def loopbacks(self) -> None:
        for default in ("gloo", "nccl"):
            def one(default=default) -> str:
                if self.dry:
                    raise Skipped("dry run: the loopback needs a GPU (tests/gpu/loopback.py says SKIP without one)")
                if self.gpus < 1:
                    raise Skipped("no GPU visible")
                result = self.work / f"loopback-{default}.json"
                result.unlink(missing_ok=True)
                wait = WATCHDOG_WAIT_S if default == "gloo" else 0
                args = [str(ROOT / "tests" / "gpu" / "loopback.py"), default, str(result),
                        "--rounds", str(LOOPBACK_ROUNDS), "--watchdog-wait", str(wait)]
                cmd = [PY, *args] if default == "gloo" else self.torchrun(1, *args)
                proc = self.run(f"loopback-{default}", cmd, timeout=240 + wait)
                if not result.exists():
                    raise Failed(f"exited {proc.returncode} without its result: {_last_error(proc.stderr)}")
                return judge_loopback(json.loads(result.read_text()), proc.returncode, wait)
            self.step(f"loopback-{default} 1 GPU", one)

    # ---- 4. import with CUDA visible -----------------------------------------------------
    def imports(self) -> None:
        state: dict = {}
        work = self.work / "import"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)

        def cli() -> str:
            state["hf"] = make_hf(work / "hf")
            smi = None if self.dry else shutil.which("nvidia-smi")
            save = work / "meg_cli"
            cmd = [PY, "-m", "distconv", "import", "--load", str(state["hf"]), "--save", str(save),
                   "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
            if smi is None:
                proc = self.run("import-cli", cmd, timeout=300)
                seen = None
            else:
                state["calibration"] = self.calibrate(smi)
                proc, seen = self.run_watching_gpus("import-cli", cmd, smi, timeout=300)
            if proc.returncode != 0:
                raise Failed(f"import exited {proc.returncode}: {_last_error(proc.stderr)}")
            if (save / "latest_checkpointed_iteration.txt").read_text() != "release":
                raise Failed("no release tracker in the imported checkpoint")
            state["meg"] = save
            state["seen"] = seen
            return "python -m distconv import (1 process, TP2 PP2 chunks) exited 0" + (
                "" if not self.dry else " (dry run: CUDA hidden)")

        def contexts_smi() -> str:
            if self.dry:
                raise Skipped("dry run: no GPUs to watch")
            if shutil.which("nvidia-smi") is None:
                raise Skipped("nvidia-smi not found")
            if self.gpus < 1:
                raise Skipped("no GPU visible: nothing to measure")
            if "seen" not in state:
                raise Skipped("the import above failed")
            calibrated, note = state["calibration"]
            if not calibrated:
                raise Skipped(f"nvidia-smi cannot see this machine's processes ({note}): no measurement")
            pids, samples, pid = state["seen"]
            if len(pids) > 1:
                raise Failed(f"{len(pids)} compute processes appeared on the GPUs during the import (pids {sorted(pids)}, "
                             f"import pid {pid}, {samples} samples)")
            return (f"nvidia-smi --query-compute-apps: {len(pids)} new compute process(es) during the import "
                    f"({sorted(pids) or 'none'}; import pid {pid}; {samples} samples ~0.2 s apart; calibration: {note})")

        def contexts_inside() -> str:
            if "hf" not in state:
                raise Skipped("no source model (the step above failed)")
            if not self.dry and self.gpus < 1:
                raise Skipped("no GPU visible: nothing to measure")
            save = work / "meg_probe"
            cmd = [PY, str(ROOT / "tests" / "gpu" / "import_probe.py"), str(work / "probe.json"), "import",
                   "--load", str(state["hf"]), "--save", str(save), "--tensor-model-parallel-size", "2"]
            proc = self.run("import-probe", cmd, timeout=300)
            if proc.returncode != 0 or not (work / "probe.json").exists():
                raise Failed(f"the probed import exited {proc.returncode}: {_last_error(proc.stderr)}")
            p = json.loads((work / "probe.json").read_text())
            if p["rc"] != 0:
                raise Failed(f"distconv import returned {p['rc']} inside the probe")
            what = (f"in-process after distconv import: cuda available {p['cuda_available']}, devices {p['device_count']}, "
                    f"torch.cuda.is_initialized() {p['cuda_initialized']}, primary contexts on devices "
                    f"{p['primary_contexts']}")
            if self.dry:
                return what + " (dry run: CUDA hidden, so this proves the plumbing only)"
            if p["primary_contexts"] is None:
                raise Failed(what + ": torch cannot tell which devices hold a context")
            if len(p["primary_contexts"]) > 1:
                raise Failed(what + ": more than one CUDA context")
            return what

        def roundtrip() -> str:
            if "meg" not in state:
                raise Skipped("the import above failed")
            back = work / "back"
            proc = self.run("import-roundtrip", [PY, "-m", "distconv", "export", "--load", str(state["meg"]), "--save",
                                                 str(back), "--device", "cpu"], timeout=300)
            if proc.returncode != 0:
                raise Failed(f"export of the imported checkpoint exited {proc.returncode}: {_last_error(proc.stderr)}")
            diff = hf_vs_hf(state["hf"], back)
            if not diff <= TOL:
                raise Failed(f"HF -> import -> export: max |logits diff| {diff:.3e} > {TOL:g}")
            return f"HF -> import (TP2 PP2) -> export: max |logits diff| vs the source model {diff:.2e} <= {TOL:g}"

        self.step("import-cli", cli)
        self.step("import-cuda-contexts nvidia-smi", contexts_smi)
        self.step("import-cuda-contexts in-process", contexts_inside)
        self.step("import-roundtrip", roundtrip)

    def calibrate(self, smi: str) -> tuple[bool, str]:
        """Does nvidia-smi list a process of ours that surely holds a CUDA context? (Not in every container.)"""
        code = "import time, torch; torch.zeros(1, device='cuda'); print('ready', flush=True); time.sleep(6)"
        proc, seen = self.run_watching_gpus("import-calibration", [PY, "-c", code], smi, timeout=120)
        pids = seen[0]
        if proc.returncode != 0:
            return False, f"the calibration process failed: {_last_error(proc.stderr)}"
        if not pids:
            return False, "a process holding a CUDA context was not listed"
        return True, f"a process holding a context showed as {len(pids)} entry"

    def run_watching_gpus(self, name: str, cmd: list[str], smi: str, timeout: float):
        """Run ``cmd`` while sampling the GPUs' compute processes; returns (proc, (new pids, samples, pid))."""
        def sample() -> set[str]:
            r = subprocess.run([smi, "--query-compute-apps=pid", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30)
            return {l.strip() for l in r.stdout.splitlines() if l.strip().isdigit()}  # not NVML's error lines

        log = self.logs / f"{_slug(name)}.log"
        before = sample()
        start = time.monotonic()
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(), stdout=out, stderr=err, text=True,
                                    start_new_session=True)
            seen: set[str] = set()
            samples = 0
            while proc.poll() is None:
                if time.monotonic() - start > timeout:
                    _kill_session(proc)
                    proc.wait()
                    raise Failed(f"timed out after {timeout:.0f} s (log {log})")
                seen |= sample() - before
                samples += 1
                time.sleep(0.2)
            out.seek(0), err.seek(0)
            stdout, stderr = out.read(), err.read()
        _write_log(log, cmd, proc.returncode, time.monotonic() - start, stdout,
                   stderr + f"\n[nvidia-smi before: {sorted(before)}; new during the run: {sorted(seen)}; {samples} samples]")
        return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), (seen, samples, proc.pid)

    # ---- 5. several GPUs ---------------------------------------------------------------
    def multi(self) -> None:
        label = "gloo, --device cpu (dry run)" if self.dry else "NCCL, --device cuda"
        model, layout = DENSE
        for world in (2, 4):
            def export_world(world=world) -> str:
                if not self.dry and self.gpus < world:
                    raise Skipped(f"needs {world} GPUs, {self.gpus} found (NCCL refuses two ranks on one GPU)")
                if self.dry and world > 2:
                    raise Skipped("dry run: world 2 covers the plumbing")
                save, report = self.export(f"w{world}-{model}-{layout}", f"{model}-{layout}_w{world}_{self.device}",
                                           model, layout, self.device, nproc=world)
                diff = logits_diff(self.fx, model, save)
                if not diff <= TOL:
                    raise Failed(f"{label}: max |logits - megatron-core| {diff:.3e} > {TOL:g}")
                same = self.compare_with_cpu(save, model, layout)
                peaks = [r.get("peak_cuda_bytes") for r in report.get("ranks", [])]
                if report.get("world_size") != world:
                    raise Failed(f"the report says world {report.get('world_size')}")
                if not self.dry and any(not p for p in peaks):
                    raise Failed(f"a rank shows no CUDA memory use in the report: peak_cuda_bytes {peaks}")
                return (f"{label}, {world} ranks: logits {diff:.2e} <= {TOL:g}; {same}"
                        + ("" if self.dry else f"; peak_cuda_bytes per rank {peaks}"))
            self.step(f"export-w{world} {model}-{layout}", export_world)

        def writers() -> str:
            self.need_gpus(2)
            save, report = self.export(f"writers2-{model}", f"{model}-{layout}_writers2_{self.device}", model, layout,
                                       self.device, nproc=2, extra=("--writers", "2", "--max-shard-size", "200KB"))
            files = sorted(p.name for p in save.glob("*.safetensors"))
            if len(files) < 2:
                raise Failed(f"--writers 2 with 200KB shards wrote {len(files)} file(s)")
            diff = logits_diff(self.fx, model, save)
            if not diff <= TOL:
                raise Failed(f"max |logits - megatron-core| {diff:.3e} > {TOL:g}")
            ref = self.cpu_exports.get(DENSE)
            same = ""
            if ref is not None:
                n = same_tensors(save, ref)
                same = f"; all {n} tensors equal to the 1-rank --device cpu export"
            return f"{label}, 2 ranks, --writers 2: {len(files)} files, logits {diff:.2e}{same}"

        def kill() -> str:
            self.need_gpus(2)
            return self.rank_killed(label)

        def oversubscribed() -> str:
            if self.dry:
                raise Skipped("dry run: without GPUs --device auto uses gloo without a warning; nothing to show")
            self.need_gpus(2)
            nproc = self.gpus + 1
            save, report = self.export(f"oversubscribed-{model}", f"{model}-{layout}_auto_{nproc}ranks", model, layout,
                                       "auto", nproc=nproc, timeout=420)
            log = (self.logs / f"{_slug('oversubscribed-' + model)}.log").read_text()
            if "gathering over gloo" not in log:
                raise Failed(f"{nproc} ranks on {self.gpus} GPUs with --device auto: no 'gathering over gloo' warning")
            diff = logits_diff(self.fx, model, save)
            if not diff <= TOL:
                raise Failed(f"max |logits - megatron-core| {diff:.3e} > {TOL:g}")
            warning = next(l for l in log.splitlines() if "gathering over gloo" in l)
            return f"{nproc} ranks on {self.gpus} GPUs, --device auto: exit 0, logits {diff:.2e}, warned: {warning.strip()[:160]}"

        self.step(f"writers2 {model}-{layout}", writers)
        self.step(f"rank-killed {model}-{layout}", kill)
        self.step(f"more-ranks-than-gpus {model}-{layout}", oversubscribed)

    # ---- 6. an fsdp_dtensor save written by Megatron-FSDP itself ------------------------
    def megatron_fsdp(self) -> str:
        if self.dry:
            raise Skipped("dry run: Megatron-FSDP needs CUDA (the suite's fsdp_dtensor saves are its CPU emulation)")
        self.need_gpus(1)
        nproc = min(2, self.gpus)
        real, emulated = self.work / "megatron-fsdp", self.work / "fsdp-emulated"
        for folder in (real, emulated):
            shutil.rmtree(folder, ignore_errors=True)
        built = ["--built", str(self.fx)]
        for name, cmd, cuda in (
                ("megatron-fsdp-save", self.torchrun(nproc, str(ROOT / "tests" / "gpu" / "fsdp_save.py"), *built,
                                                     "--out", str(real), "--only", *FSDP_FIXTURES), True),
                ("fsdp-emulated-save", self.torchrun(nproc, "-m", "tests.fixtures.fsdp_dtensor", *built,
                                                     "--out", str(emulated)), False)):
            proc = self.run(name, cmd, timeout=420, cuda=cuda)
            if proc.returncode != 0:
                raise Failed(f"{name} exited {proc.returncode}: {_last_error(proc.stderr)} (log {self.logs / name}.log)")
        done = []
        for model in FSDP_FIXTURES:
            exports = {}
            for label, save in (("real", real / f"{model}_megatron_fsdp"), ("emulated", emulated / f"{model}_fsdp")):
                out = self.work / "exports" / f"{model}_{label}_fsdp"
                name = f"export-{label}-fsdp-{model}"
                proc = self.run(name, [PY, "-m", "distconv", "export", "--load", str(save), "--save", str(out),
                                       "--device", "cpu", "--overwrite"], timeout=300, cuda=False)
                if proc.returncode != 0:
                    raise Failed(f"exporting {save} exited {proc.returncode}: {_last_error(proc.stderr)}")
                exports[label] = out
            diff = logits_diff(self.fx, model, exports["real"])
            if not diff <= TOL:
                raise Failed(f"{model}: Megatron-FSDP's save exported: max |logits - megatron-core| {diff:.3e} > {TOL:g}")
            layout = same_dcp_layout(real / f"{model}_megatron_fsdp", emulated / f"{model}_fsdp")
            files = same_safetensors(exports["real"], exports["emulated"])
            done.append(f"{model}: logits {diff:.2e}, {layout}, export byte-identical to the emulation's ({files} file(s))")
        return f"Megatron-FSDP at DP{nproc}: " + "; ".join(done)

    def need_gpus(self, n: int) -> None:
        self.need_fixtures()
        if not self.dry and self.gpus < n:
            raise Skipped(f"needs {n} GPUs, {self.gpus} found (NCCL refuses two ranks on one GPU)")

    def compare_with_cpu(self, save: Path, model: str, layout: str) -> str:
        ref = self.cpu_exports.get((model, layout))
        if ref is None:
            raise Failed("no 1-rank --device cpu export to compare with (see identical-w1)")
        n = same_safetensors(save, ref)
        return f"{n} safetensors file(s) byte-identical to the 1-rank --device cpu export"

    def rank_killed(self, label: str) -> str:
        model, layout = DENSE
        out = self.work / "kill" / "hf"
        shutil.rmtree(out.parent, ignore_errors=True)
        out.parent.mkdir(parents=True)
        cmd = self.torchrun(2, "-m", "distconv", "export", "--load", str(self.fx / model / layout), "--save", str(out),
                            "--device", self.device, "--timeout", str(KILL_TIMEOUT_S), *SLOW)
        log = self.logs / "rank-killed.log"
        with tempfile.TemporaryFile("w+") as so, tempfile.TemporaryFile("w+") as se:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(), stdout=so, stderr=se, text=True, start_new_session=True)
            try:
                end = time.monotonic() + 300
                while len(list(out.parent.glob(f".{out.name}.distconv-partial-*/model-*.safetensors"))) < 3:
                    if proc.poll() is not None:
                        raise Failed(f"the export ended ({proc.returncode}) before the kill (log {log})")
                    if time.monotonic() > end:
                        raise Failed(f"the export never got going (log {log})")
                    time.sleep(0.01)
                rank1 = [pid for pid, env in _children(proc.pid).items() if env.get("RANK") == "1"]
                if len(rank1) != 1:
                    raise Failed(f"found {len(rank1)} processes with RANK=1 under torchrun")
                os.kill(rank1[0], signal.SIGKILL)
                killed = time.monotonic()
                try:
                    proc.wait(timeout=KILL_EXIT_WITHIN_S + 60)
                except subprocess.TimeoutExpired:
                    raise Failed(f"torchrun still running {KILL_EXIT_WITHIN_S + 60} s after rank 1 was killed")
                took = time.monotonic() - killed
            finally:
                if proc.poll() is None:
                    _kill_session(proc)
                    proc.wait()
                so.seek(0), se.seek(0)
                stdout, stderr = so.read(), se.read()
                _write_log(log, cmd, proc.returncode, 0.0, stdout, stderr)
        codes = dict(re.findall(r"rank\s*: (\d+) \(local_rank.*\n\s*exitcode\s*: (-?\d+)", stderr))
        leftovers = list(_complete_looking(out))
        problems = []
        if proc.returncode == 0:
            problems.append("torchrun exited 0")
        if took > KILL_EXIT_WITHIN_S:
            problems.append(f"ranks took {took:.0f} s to exit (> {KILL_EXIT_WITHIN_S} s)")
        if sorted(codes) != ["0", "1"] or any(int(c) == 0 for c in codes.values()):
            problems.append(f"torchrun's summary shows exit codes {codes or 'none'}")
        if out.exists():
            problems.append(f"{out} exists")
        if leftovers:
            problems.append(f"complete-looking leftovers: {leftovers}")
        if problems:
            raise Failed("; ".join(problems) + f" (log {log})")
        return (f"{label}, 2 ranks, --timeout {KILL_TIMEOUT_S}: rank 1 SIGKILLed mid-run, all ranks exited non-zero "
                f"({codes}) {took:.1f} s later, nothing complete-looking left")

    # ---- all ---------------------------------------------------------------------------
    def main(self) -> int:
        if self.dry:
            self.gpus = 0
            print(f"# CPU dry run: every step with --device cpu and CUDA hidden; output under {self.out}", flush=True)
        else:
            self.gpus = count_gpus(self.env())
            print(f"# {self.gpus} GPU(s) visible; output under {self.out}", flush=True)
        self.step("gpus", self.gpu_check)
        self.step("build-fixtures", self.build)
        for model, layout in W1_CASES:
            self.world1(model, layout)
        self.step("hook-" + ("gloo" if self.dry else "nccl") + " 1-rank job", self.hook)
        self.loopbacks()
        self.imports()
        self.multi()
        self.step("megatron-fsdp fsdp_dtensor save", self.megatron_fsdp)
        fails = [r for r in self.results if r[0] == "FAIL"]
        counts = {s: sum(r[0] == s for r in self.results) for s in ("PASS", "FAIL", "SKIP")}
        tail = f"# {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped; summary {self.summary}, logs {self.logs}"
        print(tail, flush=True)
        with self.summary.open("a") as f:
            f.write(tail + "\n")
        return 1 if fails else 0

    def gpu_check(self) -> str:
        if self.dry:
            raise Skipped("dry run: the GPUs are not used")
        if self.gpus < 1:
            raise Failed("no CUDA device visible to torch: this check needs at least one GPU (or --cpu-dry-run)")
        skipped = ", ".join(["export at world 2/4 over NCCL", "--writers 2", "a rank killed mid-run",
                             "more ranks than GPUs"]) if self.gpus < 2 else ""
        return f"{self.gpus} CUDA device(s)" + (f"; with one GPU these are skipped: {skipped}" if skipped else "")


def judge_loopback(r: dict, returncode: int, wait: float) -> str:
    """tests/gpu/loopback.py's result: one PASS line, or Failed naming every problem."""
    if "skipped" in r:
        raise Failed(f"the loopback found no GPU although this machine has one: {r['skipped']}")
    problems = []
    if returncode != 0:
        problems.append(f"the process exited {returncode}" + (" (NCCL's watchdog?)" if returncode in (-6, 134) else ""))
    lb, hook, st = r.get("loopback", {}), r.get("hook", {}), r.get("stalled", {})
    if not lb.get("ok"):
        problems.append(f"loopback not bit-exact or failed: {lb}")
    elif lb.get("rounds") != LOOPBACK_ROUNDS:
        problems.append(f"{lb.get('rounds')} rounds, not {LOOPBACK_ROUNDS}")
    if lb.get("ok") and not lb.get("pinned_bytes_before_clear"):
        problems.append("the staging buffers were not pinned (cudaHostRegister failed?)")
    if lb.get("pinned_bytes_after_clear"):
        problems.append(f"{lb['pinned_bytes_after_clear']} bytes still pinned after clear()")
    if hook.get("peak_after_setup", 0) < hook.get("peak_before", 0):
        problems.append(f"Comm.setup in the caller's group reset its peak memory statistics: {hook}")
    if hook.get("current_device_after") != 0:
        problems.append(f"the caller's current device changed: {hook}")
    raised = st.get("raised") or ""
    if "did not finish within" not in raised:
        problems.append(f"the stalled receive did not raise the timeout error: {raised!r}")
    elif st.get("raised_after_s", 1e9) > 4 + 3:
        problems.append(f"the stalled receive raised after {st['raised_after_s']} s (deadline 4 s)")
    if not st.get("close_returned"):
        problems.append("Comm.close(clean=False) did not return within 60 s (finalized instead of aborting?)")
    if not st.get("synchronized_after_abort"):
        problems.append("the device did not synchronize within 30 s after the abort (the stalled kernel stayed)")
    if problems:
        raise Failed("; ".join(problems))
    return (f"{r['default']} default group, torch {r['torch']}, NCCL {r['nccl']}: {lb['rounds']} rounds, "
            f"{lb['sent_bytes'] / 1e6:.1f} MB sent to itself bit-exact in {lb['seconds']} s, "
            f"{lb['pinned_bytes_before_clear']} pinned bytes released by clear(); peak statistics kept "
            f"({hook['peak_before']} -> {hook['peak_after_setup']}); stalled receive raised after "
            f"{st['raised_after_s']} s, aborted in {st['close_s']} s, device synchronized"
            + (f", alive {wait:.0f} s later" if wait else ""))


# ---- helpers (CPU only) -------------------------------------------------------------------
def count_gpus(env: dict[str, str]) -> int:
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    r = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    try:
        return int(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def logits_diff(fx: Path, model: str, folder: Path) -> float:
    """Max |transformers' logits on the exported folder - megatron-core's recorded ones| (fp32, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    ref = torch.load(fx / "refs" / f"{model}.pt")
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=False).eval()
    with torch.no_grad():
        logits = hf(ref["tokens"]).logits
    return (logits - ref["logits"][..., : logits.shape[-1]]).abs().max().item()


def hf_vs_hf(a: Path, b: Path) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    tokens = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(11))
    out = []
    for folder in (a, b):
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=False).eval()
        with torch.no_grad():
            out.append(model(tokens).logits)
    return (out[0] - out[1]).abs().max().item()


def make_hf(folder: Path) -> Path:
    """A tiny random Llama (norms random too), as tests/test_import.py makes it."""
    import torch
    import transformers

    _quiet_transformers()
    config = transformers.LlamaConfig(vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rms_norm_eps=1e-6, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    model = transformers.AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            base = 1.0 if "norm" in name else 0.0
            p.copy_(base + (0.2 if "norm" in name else 0.05) * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(folder))
    return folder


def same_safetensors(a: Path, b: Path) -> int:
    files_a = sorted(p.name for p in a.glob("*.safetensors"))
    files_b = sorted(p.name for p in b.glob("*.safetensors"))
    if not files_a or files_a != files_b:
        raise Failed(f"different safetensors files: {files_a} vs {files_b}")
    differ = [n for n in files_a if _sha256(a / n) != _sha256(b / n)]
    if differ:
        raise Failed(f"{len(differ)} of {len(files_a)} safetensors files differ in bytes: {differ[:4]}")
    return len(files_a)


def same_dcp_layout(a: Path, b: Path) -> str:
    """The model tensors of two DCP saves: the same keys, global shapes, dtypes and stored chunks."""
    import torch.distributed.checkpoint as dcp

    def layout(root: Path) -> dict:
        folder = next(root.glob("iter_*"))
        meta = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
        return {k: (tuple(v.size), str(v.properties.dtype), sorted((tuple(c.offsets), tuple(c.sizes)) for c in v.chunks))
                for k, v in meta.items() if k.startswith("model.") and hasattr(v, "chunks")}

    la, lb = layout(a), layout(b)
    if la != lb:
        only = sorted(set(la) ^ set(lb))
        differ = [k for k in sorted(set(la) & set(lb)) if la[k] != lb[k]]
        raise Failed(f"{a.name} vs {b.name}: keys in one only {only[:4]}, differing shape/dtype/chunks {differ[:4]}"
                     + (f" ({la[differ[0]]} vs {lb[differ[0]]})" if differ else ""))
    return f"{len(la)} model keys with the same shapes, dtypes and chunks as the emulation's"


def same_tensors(a: Path, b: Path) -> int:
    import torch
    from safetensors.torch import load_file

    def load(folder: Path) -> dict:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    ta, tb = load(a), load(b)
    if set(ta) != set(tb):
        raise Failed(f"different tensor names: {sorted(set(ta) ^ set(tb))[:4]}")
    differ = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    if differ:
        raise Failed(f"{len(differ)} tensors differ: {differ[:4]}")
    return len(ta)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _complete_looking(out: Path):
    for folder in out.parent.glob(f".{out.name}.distconv-*"):
        names = {p.name for p in folder.iterdir()}
        if names & {"model.safetensors.index.json", "distconv.json"}:
            yield str(folder)


def _children(pid: int) -> dict[int, dict[str, str]]:
    """Environment of each child process of ``pid`` (torchrun's workers)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                env = (stat.parent / "environ").read_bytes().split(b"\0")
                out[int(stat.parent.name)] = dict(e.decode().split("=", 1) for e in env if b"=" in e)
        except (OSError, ValueError, IndexError):
            continue
    return out


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            kids.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    out, todo = [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_session(proc: subprocess.Popen) -> None:
    """End a command this driver started: its session and every process below it, by pid."""
    for pid in [proc.pid, *_descendants(proc.pid)]:  # found before any dies and is re-parented
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _write_log(log: Path, cmd: list[str], rc: int | None, seconds: float, stdout: str, stderr: str) -> None:
    log.write_text(f"$ {' '.join(cmd)}\n# exit {rc}, {seconds:.1f} s\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n")


def _last_error(stderr: str) -> str:
    """The line of a command's stderr that says most: distconv's error, else the last exception line."""
    lines = [l for l in stderr.splitlines() if l.strip() and not re.fullmatch(r"\s*[=\-_*#]+\s*", l)]
    mine = [l for l in lines if l.startswith("distconv: error:")]
    raised = [l for l in lines if re.match(r"\s*[\w.]*(Error|Exception|Failed)\b", l) and "ChildFailedError" not in l]
    return (mine or raised or lines or ["(no stderr)"])[-1].strip()[:300]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run every step with --device cpu and CUDA hidden (plumbing only; GPU assertions SKIP)")
    parser.add_argument("--fixtures", type=Path, help="reuse fixtures built earlier by fixtures.build")
    opts = parser.parse_args()
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(tempfile.mkdtemp(prefix="distconv-gpucheck-"))
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    return Check(out, opts.cpu_dry_run, opts.fixtures.resolve() if opts.fixtures else None).main()


if __name__ == "__main__":
    sys.exit(main())
