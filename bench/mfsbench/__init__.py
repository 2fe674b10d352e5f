"""The benchmark behind ``bench/run.py``: mistralfs against rclone mount on the same bytes.

Where things are:

- the environment: ``env`` (nginx, the emulator, the seeded file sets, mistralfs and
  rclone mounts), ``linkenv`` (the same behind shaping proxies, TLS, curl and the SDK,
  each link's calibration), ``link`` (the shaping proxy, also a script), ``procs``
  (starting and stopping processes by pid, their CPU and memory);
- the cases: ``case`` (a row and how samples are taken), ``loopback`` (R1-R5, L1, L2,
  W1, W2, M1), ``longlink`` (issue 15's rows over a link);
- the report: ``report`` (the tables, the results JSON, the chart);
- ``common``: paths, the API key, sizes, the log.
"""
