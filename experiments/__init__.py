"""Entry points that touch files: the demo now; the stage graph, sweeps, figures and report later."""
