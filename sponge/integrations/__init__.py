"""Adapters that put sponge's replay loop (`sponge.contract.ReplaySource`) into other trainers.

- `sponge.integrations.trl`:     `SpongeGRPOTrainer`, TRL's GRPOTrainer publishing every generated
                                 group to a replay source and mixing corrected replay into its batches
                                 (extra `trl`).
- `sponge.integrations.torchrl`: `ReplaySourceStorage` / `GroupSampler` / `make_replay_buffer`, a TorchRL
                                 replay buffer whose contents come from a replay source (extra `torchrl`).

Each module imports its framework when imported itself, never from here, so `import sponge` needs
neither TRL nor TorchRL.
"""
