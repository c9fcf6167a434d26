"""Search strategies over the enabled space: shrinking it during supernet training
(`shrinking`) and the evolutionary search of the trained supernet (`evolution`)."""
