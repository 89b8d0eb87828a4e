"""One batch on a device: the device choice, the (eager, bucketed, graphed) forward, lanes and memory bounds."""
