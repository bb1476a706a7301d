"""Training: batched labelled graphs, the loss of Eq. 43, the jitted step, checkpoints and the loop."""
