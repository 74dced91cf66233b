# A package, so that the rigs are imported as tests.rigs wherever they run:
# by pytest (pythonpath = . in setup.cfg), by the benchmarks, and by the
# child processes the tests start (PYTHONPATH=the checkout).
