"""The drivers of each command (SFT, RM, PPO, sweep, pipeline, generate): they read the command's config, check the
input, and drive role groups through the role interface (`rlhf.roles`) on a backend (`actors.group.RayBackend`,
or `actors.local.LocalBackend` in one process)."""
