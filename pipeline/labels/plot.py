"""The probe report as a picture: per yes/no question, a reliability diagram and precision/recall by threshold.

Left: mean ``yes_prob`` against the share people said yes, per calibration
bucket (a calibrated model lies on the diagonal), with the bucket counts as
bars. Right: precision and recall of ``yes_prob >= t`` over t, and the
threshold the asked precision gives. matplotlib comes with the ``report``
extra and is imported only here, on the Agg backend (no display needed).
"""

from __future__ import annotations

import io

from pipeline.labels.report import Report

EXTRA_HINT = "pip install 'captioner[report]'"


class PlotUnavailable(RuntimeError):
    pass


def plot_png(report: Report) -> bytes:
    """The PNG bytes of the report's figure (one row per yes/no question with reviewed yes_prob values)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable(f"--plot needs matplotlib, which is not installed; {EXTRA_HINT}") from exc
    probes = [p for p in report.probes if p.kind == "yes/no" and p.with_yes_prob]
    if not probes:
        raise PlotUnavailable("nothing to plot: no yes/no question has reviewed images with a yes_prob (schema v2 probes)")
    fig, axes = plt.subplots(len(probes), 2, figsize=(10, 3.6 * len(probes)), squeeze=False)
    for (left, right), probe in zip(axes, probes):
        buckets = [b for b in probe.calibration if b.count]
        centers = [(b.low + b.high) / 2 for b in probe.calibration]
        width = probe.calibration[0].high - probe.calibration[0].low
        counts = left.twinx()
        counts.bar(centers, [b.count for b in probe.calibration], width=width * 0.9, color="#dddddd", zorder=0)
        counts.set_ylabel("reviewed images")
        left.set_zorder(counts.get_zorder() + 1)
        left.patch.set_visible(False)
        left.plot([0, 1], [0, 1], linestyle="--", color="#888888", label="calibrated")
        left.plot([b.mean_yes_prob for b in buckets], [b.yes_rate for b in buckets], marker="o", label="model")
        left.set(xlim=(0, 1), ylim=(0, 1), xlabel="yes_prob (bucket mean)", ylabel="people said yes")
        left.set_title(_short(probe.question) + f"  (n={probe.reviewed})", fontsize=10)
        left.legend(loc="upper left", fontsize=8)
        ts = [c[0] for c in probe.curve]
        right.plot(ts, [c[1] for c in probe.curve], label="precision", drawstyle="steps-post")
        right.plot(ts, [c[2] if c[2] is not None else 0 for c in probe.curve], label="recall", drawstyle="steps-post")
        chosen = probe.threshold
        if chosen is not None and chosen.threshold is not None:
            right.axvline(chosen.threshold, color="#cc3333", linestyle=":",
                          label=f"t={chosen.threshold:.3f} (precision >= {chosen.asked_precision:g})")
        right.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="threshold t (yes_prob >= t)")
        right.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def _short(question: str, limit: int = 60) -> str:
    return question if len(question) <= limit else question[: limit - 1] + "…"
