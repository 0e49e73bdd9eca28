"""The web console: server-rendered pages and a JSON API for operators and reviewers (``app``), with
its defences (``security``) and the page queries (``data``). Served by ``qcgate.observability.http``
in `qcgate serve`, beside /metrics and /healthz."""
