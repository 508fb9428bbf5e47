"""Rewards: the reward functions online training calls (:mod:`.functions`: in-process scorers and remote rewards
over HTTP), the reward server that serves a scorer (:mod:`.server`), the scorers themselves (:mod:`.scorers`: CLIP
score, PickScore and the reward-model ports)."""
