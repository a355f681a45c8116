"""Developer tooling around the product: the embedded broker, `demo`, `bench` and the helpers
they and the tests share (spawn a worker, scrape its metrics, run the simulator to the end).

The product (worker, simulator, models) never imports this package; `tests/unit/test_layout.py`
enforces it. Only the CLI, which sits above both, dispatches to it.
"""
