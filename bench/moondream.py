"""Moondream engine, before and after the static engine, on CPU: proxies of what a GPU would pay.

    python bench/moondream.py                    # all of it (several minutes on 2 cores)
    python bench/moondream.py --skip-throughput  # the tiny-width proxies only

"Before" is the engine main had (bench/legacy_engine.py: growing pools, per-step index tensors, stopping
decided in Python); "after" is pipeline/models/moondream/engine.py, eager and with ``compile=True`` (the
decode step compiled with fullgraph=True; on CPU inductor's C++ kernels called from its C++ wrapper, instead
of CUDA graphs). Same random weights, same images, same prompts (EOS suppressed: every sequence decodes its
cap), in one run:

- host time per decode step (this process's CPU time, one thread) at tiny widths (bench/moondream_setup.py
  tiny_widths: the official 24 layers, one 32-dim head, vocabulary 256, a 10-token image prefix), 64 and 384
  sequences live (8 prompts per image): the median step plus its share of the bookkeeping (the legacy
  engine's retires, the static engine's harvests). The issue's proxy is host time "at tiny widths, where
  arithmetic is negligible"; at the widths used before (dim 32 with ff 64, vocabulary 1,024, an 82-token
  prefix) doubling the widths nearly doubled the 384-sequence step, i.e. it timed arithmetic more than the
  host. So the widths are the smallest the architecture allows (a 32-dim head for its 32 rotary dims), and
  the bench prints the check: the eager engines' step at twice the widths over the step at these (1.0x:
  arithmetic negligible; 2.0x: all arithmetic). Both engines run the same config side by side;
- the same with the arithmetic taken out ("host ms ... arithmetic taken out"), and the arithmetic itself:
  even at these widths a step computes (384 slots x 24 layers read their fp32 suffix keys and values,
  about 75 MB a step, on one core), which a GPU runs asynchronously while the host issues what follows,
  so the first line times that too. From a torch.profiler run of the same calls: a fused kernel's time is
  all arithmetic (its event is recorded inside the kernel), an aten op's (or an extern call's from the C++
  wrapper) only beyond the fastest call of the same op in that engine's profiles (its 64-sequence run
  stands for the 384 one; every engine also profiles a one-image call, 8 sequences, the compiled one
  after compiling a graph for it: the same rule for all three, where the compiled engine used to be
  charged its smallest GEMMs' arithmetic at 64 rows as host time), so an op's dispatch and setup, which
  a GPU host pays too, stay host time; the profiler's clock is the wall's, which a busy neighbour stretches, so each call (step or
  harvest) is read from the one of 3 profiled runs of the same calls where it was descheduled least, its
  operators' durations scaled by its CPU time over its wall time there (the first line, which the
  arithmetic is taken from, is CPU time: one clock on both sides. Unscaled, a step made of one long
  fused kernel, the compiled step at small widths, measured more arithmetic on the wall's clock than its
  whole CPU time, a negative host time; the eager engines' many short operators were stretched less,
  but stretched too). The arithmetic per step is taken from the CPU time per step of the first line.
  What remains is what the host does to issue a step: Python, dispatch, TorchDynamo's guards, the
  compiled graph's wrapper, the harvests. It counts each operator's fixed cost as host time, also in the
  compiled step, where one CUDA graph replay would stand for them all on a GPU: if anything it is high
  for the compiled engine;
- operators per decode step from torch.profiler (top-level aten ops plus inductor's fused kernels: on a
  GPU, eager, each is a dispatch and most a kernel launch);
- host syncs per 100 decode steps (reads of device values: tolist/item/int/float/bool/cpu);
- images/s of the mid-size config (official widths, 2 text + 2 vision layers), caption + 5 probes,
  whole generate calls (vision and prefill included), best of alternated rounds, also per CPU-second
  (steadier on a shared machine), and whether the token ids are identical.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bench.legacy_engine as legacy  # noqa: E402
from bench.moondream_setup import mid_size, random_model, requests, tiny_widths  # noqa: E402
from pipeline.models.moondream import engine as static  # noqa: E402
from pipeline.models.moondream.preprocess import prepare_image  # noqa: E402

# Every read of a device value goes through one of these (numpy() needs a CPU tensor: cpu() came first).
_HOST_READS = ("tolist", "item", "__int__", "__float__", "__bool__", "cpu")
# The profiler events the probe puts around each decode step and each bookkeeping call.
STEP, BOOKKEEPING = "bench_decode_step", "bench_decode_bookkeeping"
TIMED_CALLS = 3  # unprofiled generate calls whose steps are timed


class Probe:
    """Wraps the decode loop's methods: time in them, steps taken, host reads and profiler ops inside them."""

    def __init__(self):
        self.step_times: list[float] = []  # each decode step
        self.other_seconds = 0.0  # harvests / retires, shared out over the steps
        self.steps, self.reads, self.inside = 0, 0, False
        self.call_seconds: list[float] = []  # every call (steps and bookkeeping) in order: CPU seconds

    def host_seconds_per_step(self) -> float:
        """The median step (robust to a neighbour's burst) plus its share of the bookkeeping calls."""
        return float(np.median(self.step_times)) + self.other_seconds / len(self.step_times)

    @contextlib.contextmanager
    def counting_reads(self):
        originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

        def counted(name):
            def read(t, *args, **kwargs):
                if self.inside:
                    self.reads += 1
                return originals[name](t, *args, **kwargs)
            return read

        for name in _HOST_READS:
            setattr(torch.Tensor, name, counted(name))
        try:
            yield
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)

    def wrap(self, owner, name: str, is_step: bool):
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            self.inside = True
            start = time.process_time()  # this process's CPU time: on a shared machine, not the neighbours'
            try:
                with torch.profiler.record_function(STEP if is_step else BOOKKEEPING):
                    return fn(*args, **kwargs)
            finally:
                spent = time.process_time() - start
                self.call_seconds.append(spent)
                if is_step:
                    self.step_times.append(spent)
                else:
                    self.other_seconds += spent
                self.inside = False
                self.steps += is_step

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, fn)


def _loop_probe(engine, probe: Probe):
    """Install the probe on the decode loop of either engine; returns the undo."""
    if isinstance(engine, legacy.MoondreamEngine):
        undo = [probe.wrap(legacy._Run, "decode_step", True), probe.wrap(legacy._Run, "retire", False)]
    else:
        undo = [probe.wrap(engine, "_decode", True), probe.wrap(static._Batch, "harvest", False)]
    return lambda: [u() for u in undo]


def _is_op(name: str) -> bool:
    """An operator call: an aten op, an extern kernel called by inductor's C++ wrapper (aoti_torch_*), or a
    fused kernel (cpp_fused_*, triton_*)."""
    return name.startswith(("aten::", "aoti_torch_", "triton_")) or "cpp_fused" in name


def _top_level_ops(prof) -> dict:
    """Top-level operators inside the decode loop, by the probe's event (a step or a bookkeeping call) they
    ran in: {event: [(operator, duration in microseconds)]}. Top-level: not called by another op (the C++
    wrapper's extern calls, e.g. aoti_torch_cpu_addmm_out, run aten ops inside them, as aten::addmm does:
    one op each)."""
    found: dict = {}
    for event in prof.events():
        if event.name in (STEP, BOOKKEEPING):
            found.setdefault(event, [])
            continue
        if not _is_op(event.name):
            continue
        parent, nested = event.cpu_parent, False
        while parent is not None and parent.name not in (STEP, BOOKKEEPING):
            nested |= _is_op(parent.name)
            parent = parent.cpu_parent
        if parent is not None and not nested:
            found.setdefault(parent, []).append((event.name, event.time_range.elapsed_us()))
    return found


def _keep_fastest(fastest: dict[str, float], calls) -> None:
    """Lower ``fastest`` (each operator's fastest call, microseconds) by ``calls``: (operator, duration) pairs."""
    for name, d in calls:
        fastest[name] = min(d, fastest.get(name, d))


def _calls(prof) -> list[tuple[str, float, list]]:
    """The probe's calls in a profile, in order: (STEP or BOOKKEEPING, its wall microseconds, [(operator,
    microseconds)])."""
    return [(e.name, e.time_range.elapsed_us(), d)
            for e, d in sorted(_top_level_ops(prof).items(), key=lambda item: item[0].time_range.start)]


def _arithmetic_ms(runs: list[tuple[list[tuple[str, float, list]], list[float]]], fastest: dict[str, float]) -> float:
    """Per decode step, the time of the operators' arithmetic, i.e. what a GPU would run asynchronously
    while the host issues the next operators, from profiles (``runs``, _calls) of identical calls. Which
    time is arithmetic: a fused kernel's event is recorded inside the kernel (nothing but its loops: all of
    it); an aten op's (or an extern call's) event also holds its dispatch and setup, which a GPU host pays
    too, so the fastest call of the same operator (``fastest``: in this engine's profiles, where the
    smallest calls' arithmetic is small) is kept as host time and only the rest counts. The profiler's clock
    is the wall's, which a busy neighbour stretches, while the step times it is taken from are this
    process's CPU time. So each call (the same call in each run: same step, same place) is read from the
    run where it was descheduled least, i.e. where its CPU time over its wall time was highest (``runs``
    pairs each profile with the probe's CPU seconds of its calls, in order), and its operators' durations
    are scaled by that ratio (at most 1: a call descheduled for a third of its wall time computed for two
    thirds of it): one clock on both sides. Unscaled (each operator's fastest wall time over the runs, as
    before), a step made of one long fused kernel (the compiled step at small widths, 384 sequences)
    measured more arithmetic than its whole CPU time; the minimum of scaled durations over the runs
    would be biased low instead (an operator that ran undisturbed in a step that was not). An operator's
    arithmetic is never below 0. The median step's, plus its share of the bookkeeping calls', as
    host_seconds_per_step adds them up."""
    first = runs[0][0]

    def shape(calls):
        return [(kind, [n for n, _ in ops]) for kind, _, ops in calls]

    same = [(calls, cpu) for calls, cpu in runs if shape(calls) == shape(first) and len(cpu) == len(first)]
    per_step, other = [], 0.0
    for k, (kind, _, ops) in enumerate(first):
        scale, least_descheduled = max(((min(1.0, 1e6 * cpu[k] / max(run[k][1], 1e-9)), run) for run, cpu in same),
                                       key=lambda pair: pair[0])
        total = 0.0
        for name, duration in least_descheduled[k][2]:
            total += max(0.0, duration * scale - (0.0 if "cpp_fused" in name else fastest[name]))
        if kind == STEP:
            per_step.append(total)
        else:
            other += total
    return (float(np.median(per_step)) + other / len(per_step)) / 1e3


def decode_proxies(engine, crops, reqs, fastest: dict[str, float], one_image: bool = False,
                   profiles: int = 3) -> dict:
    """The proxies for one engine on one batch. ``fastest``: each operator's fastest call in this engine's
    profiles so far (updated here: a smaller batch's calls stand for a larger one's host cost).
    ``one_image``: also profile a one-image call (8 sequences) for them, after one unprofiled (a compiled
    engine compiles a graph for it there). ``profiles``: profiled calls, for the arithmetic."""
    engine.generate(crops, [reqs] * len(crops))  # warm-up: allocation, compilation
    probe = Probe()
    undo = _loop_probe(engine, probe)
    try:
        with probe.counting_reads():
            for _ in range(TIMED_CALLS):  # more steps for the median: a 384-sequence call is only ~12 steps
                engine.generate(crops, [reqs] * len(crops))
        timing = (probe.host_seconds_per_step(), 100 * probe.reads / probe.steps)
        if one_image:
            engine.generate(crops[:1], [reqs])  # warm-up (a compiled engine: a graph for one image row)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                engine.generate(crops[:1], [reqs])
            _keep_fastest(fastest, (call for calls in _top_level_ops(prof).values() for call in calls))
        runs = []
        for _ in range(profiles):
            probe.steps, probe.call_seconds = 0, []
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                engine.generate(crops, [reqs] * len(crops))
            runs.append((_calls(prof), probe.call_seconds))
        _keep_fastest(fastest, (op for calls, _ in runs for _, _, ops in calls for op in ops))
        arithmetic = _arithmetic_ms(runs, fastest)
        per_step_ops = sum(len(ops) for _, _, ops in runs[0][0]) / probe.steps
    finally:
        undo()
    return {"ms": 1e3 * timing[0], "host": 1e3 * timing[0] - arithmetic, "arithmetic": arithmetic,
            "syncs": timing[1], "ops": per_step_ops}


def _engines(model, max_sequences: int, compile_after: bool):
    out = [("before", legacy.MoondreamEngine(model, max_sequences=max_sequences)),
           ("after eager", static.MoondreamEngine(model, max_sequences=max_sequences))]
    if compile_after:
        out.append(("after compiled", static.MoondreamEngine(model, max_sequences=max_sequences, compile=True)))
    return out


def _row(label: str, values: dict, labels: list[str], fmt: str, better_lower: bool = True) -> str:
    before = values["before"]
    cells = "".join(f"{values[k]:>16{fmt}}" if k in values else f"{'-':>16}" for k in labels)
    best = min(v for k, v in values.items() if k != "before") if better_lower else max(
        v for k, v in values.items() if k != "before")
    if min(values.values()) <= 0:
        # A host time with the arithmetic taken out at or below 0: the step is arithmetic-bound there (the
        # estimate of its arithmetic exceeds its CPU time), so no ratio is a measurement.
        return f"{label:<34}{cells}{'n/a':>13}   (a figure <= 0: arithmetic-bound, not measured)"
    ratio = (before / best if better_lower else best / before) if before and best else float("nan")
    return f"{label:<34}{cells}{ratio:>12.1f}x"


def harvest_sweep(args, rng) -> None:
    """How often to look at the device: a look costs a sync, and a stopped sequence holds its slot until the
    next look. Mid-size config, whole generate calls, the static engine eager."""
    model = random_model(mid_size(), "cpu", torch.float32)
    crops = [prepare_image(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)) for _ in range(args.images)]
    reqs = requests(args.caption_tokens, args.answer_tokens)
    for k in (int(v) for v in args.harvest_sweep.split(",")):
        engine = static.MoondreamEngine(model, max_sequences=64, harvest_every=k)
        engine.generate(crops[:1], [reqs[:2]])
        start = time.perf_counter()
        engine.generate(crops, [reqs] * len(crops))
        print(f"harvest_every {k:>3}: {len(crops) / (time.perf_counter() - start):.3f} images/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", default="64,384", help="live sequences for the tiny-width proxies")
    ap.add_argument("--tokens", type=int, default=12, help="tokens each sequence decodes in the proxies")
    ap.add_argument("--text-layers", type=int, default=24, help="tiny-width text layers")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled engine (compiling takes minutes)")
    ap.add_argument("--skip-throughput", action="store_true", help="skip the mid-size images/s comparison")
    ap.add_argument("--images", type=int, default=4, help="mid-size images (1024x768, 13 crops)")
    ap.add_argument("--caption-tokens", type=int, default=24)
    ap.add_argument("--harvest-sweep", default="", help="e.g. 1,2,4,8,16: mid-size images/s of the static engine "
                    "(eager) for each harvest_every, instead of everything else")
    ap.add_argument("--answer-tokens", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="alternated mid-size rounds (best of each is kept)")
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    if args.harvest_sweep:
        return harvest_sweep(args, rng)
    compile_after = not args.no_compile
    if compile_after:
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
        inductor_config.cpp.enable_kernel_profile = True  # fused kernels show in the profiler, to be counted

    # One thread: the arithmetic is negligible here, and OpenMP barriers on a shared machine would time
    # the neighbours, not the host work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = tiny_widths(args.text_layers)
    model = random_model(config, "cpu", torch.float32)
    print(f"tiny widths: text {config.text.n_layers} layers dim {config.text.dim} ff {config.text.ff_dim} vocabulary "
          f"{config.text.vocab_size}, image prefix {config.prefix_len} tokens, fp32 CPU, torch threads "
          f"{torch.get_num_threads()} (the mid-size run: {threads}); 8 prompts per image, {args.tokens} tokens each")
    side = config.vision.crop_size  # one crop: the step's shapes do not depend on crop counts anyway
    small = prepare_image(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), config.vision.crop_geometry)
    reqs = requests(args.tokens, args.tokens, vocab_size=config.text.vocab_size, probes=7)
    table: dict[str, dict] = {}
    fastest: dict[str, dict] = {}  # by engine: each operator's fastest call, across the sequence counts
    for n in sorted(int(v) for v in args.sequences.split(",")):
        crops = [small] * (n // len(reqs))
        for label, engine in _engines(model, n, compile_after):
            legacy_reqs = [legacy.Request(r.prompt, r.max_tokens, r.yes_no) for r in reqs]
            found = decode_proxies(engine, crops, legacy_reqs if label == "before" else reqs,
                                   fastest.setdefault(label, {}), one_image=True)
            for key, value in found.items():
                table.setdefault(f"{key}@{n}", {})[label] = value
            print(f"  {n} sequences, {label}: {found['ms']:.2f} ms/step ({found['host']:.2f} with the arithmetic "
                  f"taken out, {found['arithmetic']:.2f} arithmetic), {found['ops']:.0f} ops/step, "
                  f"{found['syncs']:.0f} syncs/100 steps", flush=True)

    # Is arithmetic negligible? The same steps at twice the widths (eager engines: no compile to wait for).
    wide = random_model(tiny_widths(args.text_layers, width=2), "cpu", torch.float32)
    for n in (int(v) for v in args.sequences.split(",")):
        crops = [small] * (n // len(reqs))
        for label, engine in _engines(wide, n, False):
            legacy_reqs = [legacy.Request(r.prompt, r.max_tokens, r.yes_no) for r in reqs]
            ms = decode_proxies(engine, crops, legacy_reqs if label == "before" else reqs, {})["ms"]
            table.setdefault(f"wide@{n}", {})[label] = ms / table[f"ms@{n}"][label]
            print(f"  {n} sequences, {label}, twice the widths: {ms:.2f} ms/step", flush=True)

    torch.set_num_threads(threads)
    if not args.skip_throughput:
        config = mid_size()
        model = random_model(config, "cpu", torch.float32)
        crops = [prepare_image(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)) for _ in range(args.images)]
        reqs = requests(args.caption_tokens, args.answer_tokens)
        ids = {}
        engines = _engines(model, 64, False)
        for label, engine in engines:
            per = [legacy.Request(r.prompt, r.max_tokens, r.yes_no) for r in reqs] if label == "before" else reqs
            engine.generate(crops[:1], [per[:2]])  # warm-up
        # Alternated rounds, best of each: the load of a shared machine moves between runs.
        for _ in range(args.rounds):
            for label, engine in engines:
                per = [legacy.Request(r.prompt, r.max_tokens, r.yes_no) for r in reqs] if label == "before" else reqs
                start, cpu = time.perf_counter(), time.process_time()
                out = engine.generate(crops, [per] * len(crops))
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
                best = table.setdefault("images/s", {})
                best[label] = max(best.get(label, 0.0), len(crops) / wall)
                per_cpu = table.setdefault("images/cpu-s", {})
                per_cpu[label] = max(per_cpu.get(label, 0.0), len(crops) / cpu)
                ids[label] = [g.ids for per_image in out for g in per_image]
                print(f"  mid-size, {label}: {len(crops) / wall:.3f} images/s, {len(crops) / cpu:.3f} images per "
                      f"CPU-second", flush=True)
        same = ids["before"] == ids["after eager"]

    labels = list(next(iter(table.values())))
    print()
    print(f"{'':<34}" + "".join(f"{k:>16}" for k in labels) + f"{'before/after':>13}")
    for n in (int(v) for v in args.sequences.split(",")):
        print(_row(f"host ms per decode step, {n} seqs", table[f"ms@{n}"], labels, ".2f"))
        print(_row("  the same, arithmetic taken out", table[f"host@{n}"], labels, ".2f"))
        print(_row("  (the arithmetic taken out)", table[f"arithmetic@{n}"], labels, ".2f"))
        print(_row(f"ops per decode step, {n} seqs", table[f"ops@{n}"], labels, ".0f"))
        print(_row(f"host syncs per 100 steps, {n} seqs", table[f"syncs@{n}"], labels, ".0f"))
        wide = table[f"wide@{n}"]
        print(f"{f'  step at 2x widths / 1x, {n} seqs':<34}" + "".join(
            f"{wide[k]:>15.2f}x" if k in wide else f"{'-':>16}" for k in labels)
            + "   (1.0x: arithmetic negligible, 2.0x: all arithmetic)")
    if not args.skip_throughput:
        values = dict(table["images/s"])
        print(_row(f"mid-size images/s ({args.images} x 1024x768)", values, labels, ".3f", better_lower=False)
              + f"   (ratio after/before; same ids: {same})")
        print(_row("mid-size images per CPU-second", dict(table["images/cpu-s"]), labels, ".3f", better_lower=False))


if __name__ == "__main__":
    main()
