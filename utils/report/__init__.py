"""Reports: run directories -> report.md, summary.csv and figures (``python -m utils.report``).
``experiments`` reads and groups runs, ``tables`` makes the numbers and report.md, ``figures`` the
plots, ``cli`` the command.

May import: every package below it; the command reads the harness's defaults inside its functions."""
