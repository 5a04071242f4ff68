"""The training step and what surrounds it: the guarded train step and its state,
checkpoints on disk, tf.distribute, precision, the optimizer and the debug modes."""
