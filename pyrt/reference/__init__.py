"""Reference implementations in plain Python: the oracles the Rust core is tested against.

`matcher` restates the subscription matcher (docs/matcher.md) and `pgoutput` the pgoutput
decoder (docs/pgoutput.md), each as obviously-right code rather than fast code. The
differential tests, benchmarks and fuzzers feed the same inputs to them and to `pyrt._core`
and require the same outputs. Nothing in the framework imports them: `import pyrt` does not
load this package, and importing it loads neither module until asked.
"""
