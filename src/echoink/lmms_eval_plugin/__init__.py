"""echoink's lmms-eval plugin: the model ``echoink`` (`model.EchoinkModel`), registered through the entry point
group ``lmms_eval.models`` (`manifest.MANIFEST`, named in pyproject.toml).

Everything in this package imports lmms_eval, which echoink does not depend on: nothing else in echoink imports
it, and echoink's own test suite never does (`make test-lmms-eval` runs it in its own environment). This file
imports nothing, so finding the package costs nothing.
"""
