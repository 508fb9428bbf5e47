"""What acts on a run from outside the step, as ``transformers.TrainerCallback`` objects the trainer registers:

* :mod:`.guards`: the EMA weights (``ema_decay``), the pathology action (``on_pathology``), early stopping and the
  state of the guards that adapt during a run (auto-beta, ``safeguard_mu="auto"``, escalations);
* :mod:`.health`: Diffusion-DPO's pathology, detected in the training logs;
* :mod:`.probe`: the policy and the reference on held-out pairs every ``probe_steps`` steps (``probe/...``);
* :mod:`.rewind`: ``on_pathology="rewind"``, back to the last step the probe called healthy when its alarm fires;
* :mod:`.interruptions`: a non-finite loss or gradient never reaches the weights, a data stream that yields too few
  valid pairs stops the run, and SIGTERM saves a checkpoint and exits;
* :mod:`.validation`: validation images and rewards during training.

Each decision a callback takes from a process's own data is reduced over processes before it acts.
"""
