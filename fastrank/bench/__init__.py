"""fastrank's measurement tools: `fastrank bench ...`, the pytest benchmarks in benchmarks/, the GPU check.

One module per op (maxsim, packed, lite, losses, index, rerank, train_step), the shared machinery (suite:
rows and the check-then-time step; report: the page a run writes; all: sections by name), the static and
run-time kernel reports (kernels, gpu), and two leaves the library itself may use: timing and machine.
cli registers every `fastrank bench` subcommand. This file imports nothing, so that importing
fastrank.bench.machine from the training loop loads no benchmark code.
"""
