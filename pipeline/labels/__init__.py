"""The labeling loop: model answers out to people, their labels back, and how often the model was right.

  fields.py        the labeling fields (caption, one per probe question): names, kinds, fingerprint
  label_studio.py  Label Studio: the labeling config XML, tasks with predictions, reading its JSON export
  sample.py        which images go to review (--sample N: stratified or uncertainty-first)
  store.py         the human labels file beside the output (versioned JSON, written atomically)
  report.py        per-probe accuracy, precision/recall of yes, calibration, the threshold for a precision
  plot.py          the report as a PNG (matplotlib, the ``report`` extra)
  command.py       ``captioner import label-studio`` and ``captioner report probes``

``captioner export label-studio`` (pipeline.export) writes the tasks.
Human labels never touch the model's rows: they live in their own file and
are joined by ``image_id`` when a report is made.
"""
