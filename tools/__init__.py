"""snncc's command-line tools (installed as ``snncc.tools``): the schedule visualizer, the profiler and the
benchmark scripts. Each tool is a module with a ``main(argv=None) -> int``."""
