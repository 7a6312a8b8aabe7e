"""The project's benchmark harness: xent_ext against torch eager, torch.compile and (on CUDA) peers.

``python benchmarks/run.py --help`` lists the options; ``benchmarks/README.md``
explains how every number is measured.  Modules:

* ``common``: cases, one implementation's result, rows, inputs and steps;
* ``timing``: sample counts and orders, and the memory of one call;
* ``report``: number formats, the text table, header, machine info, JSON;
* ``cpu``, ``gpu`` (+ ``gpu_report``, ``peers``): what differs per device;
* ``targets``: the project's performance targets and their verdicts;
* ``cli``: the command line.
"""
