"""``report.html``: one self-contained page (plots and gallery images inline as ``data:`` URLs)."""

from __future__ import annotations

import base64
import html
import json
from typing import Any, Dict

from pipelines.report.roles import MODE_NAMES
from pipelines.run.storage import open_storage

# the headline figures, in the order of the page's first table (then every per-binariser f1 / precision / recall)
HEADLINE = ["detection_auroc", "steps_to_vanilla_final_loss_ratio", "zero_shot_acc_vanilla", "zero_shot_acc_mimic",
            "zero_shot_acc_unfiltered", "zero_shot_acc_filtered", "quality_estimate", "quality_binariser",
            "true_clean_fraction", "final_alignment"]
VERDICTS = ("label_noise_best_mode", "mimic_best_at_every_noise", "utility_top_beats_random_at_every_p")


def fmt(v: Any) -> str:
    """A figure for a table cell: floats to 4 significant digits, ``None`` as ``n/a``."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return "n/a" if v is None else str(v)


def label_noise_table(ln: Dict[str, Any]) -> str:
    """Table 1 as HTML (mean &plusmn; std over seeds, the best mode per rate in bold); empty without it."""
    acc = ln.get("label_noise_accuracy")
    if not acc:
        return ""
    rates = sorted({r for by in acc.values() for r in by}, key=float)
    best = ln.get("label_noise_best_mode", {})
    head = "<tr><th>mode</th>" + "".join(f"<th>noise {float(r) * 100:g}%</th>" for r in rates) + "</tr>"
    body = ""
    for mode in [m for m in MODE_NAMES if m in acc] + [m for m in acc if m not in MODE_NAMES]:
        cells = ""
        for r in rates:
            c = acc[mode].get(r)
            text = "n/a" if c is None else f"{c['mean'] * 100:.1f} &plusmn; {c['std'] * 100:.1f} (n={c['n']})"
            cells += f"<td>{'<b>' + text + '</b>' if best.get(r) == mode else text}</td>"
        body += f"<tr><th>{html.escape(MODE_NAMES.get(mode, mode))}</th>{cells}</tr>"
    return ("<h2>label noise: test accuracy % (mean &plusmn; std over seeds; best in bold)</h2>"
            f"<table>{head}{body}</table>")


def gallery(rows, storage_options) -> str:
    """Image cells for pool rows (``tar`` a full URL, as :func:`read_pool` gives it): one ranged read each."""
    cells = []
    for r in rows.itertuples():
        fs, tar = open_storage(r.tar, storage_options)
        data = fs.cat_file(tar, start=int(r.image_offset), end=int(r.image_offset) + int(r.image_size))
        mime = "image/png" if r.image.endswith(".png") else "image/jpeg"
        flag = " (corrupted)" if getattr(r, "corrupted", False) else ""
        cells.append(f'<figure><img src="data:{mime};base64,{base64.b64encode(data).decode()}" width="64" '
                     f'height="64"><figcaption>{html.escape(r.text)}<br>score {r.mean_score:.3g}{flag}'
                     f'</figcaption></figure>')
    return "".join(cells)


def _figure_rows(report: Dict[str, Any]) -> str:
    keys = HEADLINE + sorted(k for k in report if k.startswith(("f1_", "precision_", "recall_")))
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(fmt(report.get(k)))}</td></tr>"
                   for k in keys if k in report)
    return rows + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(json.dumps(report[k]))}</td></tr>"
                          for k in VERDICTS if k in report)


def _evaluation_rows(evaluations: Dict[str, Dict[str, Any]]) -> str:
    metrics = sorted({k for m in evaluations.values() for k in m})
    return "<tr><th>model</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in metrics) + "</tr>" + "".join(
        f"<tr><th>{html.escape(str(name))}</th>" + "".join(f"<td>{html.escape(fmt(m.get(k)))}</td>" for k in metrics)
        + "</tr>" for name, m in evaluations.items())


def page(report: Dict[str, Any], figures: Dict[str, str], gallery_cells: str) -> str:
    """The whole page: the figures, the evaluations, Table 1, the plots (``name -> base64 PNG``), the gallery."""
    rows = _figure_rows(report)
    evals = _evaluation_rows(report.get("evaluations", {}))
    imgs = "".join(f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" src="data:image/png;base64,{b64}">'
                   for name, b64 in figures.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>gradmimic report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}td,th{{padding:2px 8px;text-align:left}}
figure{{display:inline-block;width:150px;margin:4px;vertical-align:top;font-size:11px}}
figure img{{image-rendering:pixelated;width:64px;height:64px}}</style></head>
<body><h1>gradmimic report</h1><p>{html.escape(report.get("run", ""))}</p>
<p>roles: {html.escape(json.dumps(report.get("roles", {})))}</p>
<table>{rows}</table><h2>evaluations (clean test split)</h2><table>{evals}</table>
{label_noise_table(report)}
{imgs}<h2>gallery</h2>{gallery_cells}
<script>window.addEventListener("load", () => {{  // for checks in a headless browser: images that decoded
  const all = Array.from(document.images);
  document.body.dataset.images = all.length;
  document.body.dataset.loaded = all.filter(i => i.complete && i.naturalWidth > 0).length;
}});</script></body></html>
"""
