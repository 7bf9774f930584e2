"""Which user a job's plugin runs as (SPEC §6), and what it is granted. When we are root: a
per-plugin exception in the local config (`jobs.plugin_users`) first, else the job's own uid
(`user_per_job`, supervisor/identities.py), else run_as_user; ourselves otherwise. Grants
(users, write paths, capabilities) come only from the local config, never from a spec,
since specs may come from the network."""

from __future__ import annotations

import os
import pwd

from supervisor.config import Config, ConfigError

Ids = tuple[int, int] | None  # (uid, gid) to switch to; None: stay who we are


class PluginUsers:
    def __init__(self, default: Ids, exceptions: dict[str, Ids]):
        self.default = default
        self.exceptions = exceptions

    def for_plugin(self, name: str, version: str, job_uid: int | None = None) -> Ids:
        """`name@version` in plugin_users first, then `name`, then the job's own uid, then run_as_user."""
        for key in (f"{name}@{version}", name):
            if key in self.exceptions:
                return self.exceptions[key]
        if job_uid is not None:
            return job_uid, job_uid
        return self.default


def for_plugin(table: dict[str, list], name: str, version: str) -> list:
    """A plugin's entry in a local grant table (`name@version` first, then `name`); [] if none."""
    return table.get(f"{name}@{version}", table.get(name, []))


def check_capability_grants(config: Config) -> None:
    """Every capability jobs.plugin_capabilities grants must be one we hold in our bounding set
    (a systemd unit's CapabilityBoundingSet= may lack it), with CAP_SETPCAP to trim the
    plugin's; else a config error naming the key, not a failure of every run."""
    if not config.jobs.plugin_capabilities or os.geteuid() != 0:
        return
    from supervisor.config import GRANTABLE_CAPABILITIES
    bounding = _bounding_set()
    for plugin, caps in config.jobs.plugin_capabilities.items():
        for i, cap in enumerate(caps):
            for needed in (cap, "CAP_SETPCAP"):
                number = GRANTABLE_CAPABILITIES.get(needed, CAP_SETPCAP)
                if bounding is not None and not bounding >> number & 1:
                    raise ConfigError(f"key jobs.plugin_capabilities.{plugin}[{i}]: {cap} cannot be granted: "
                                      f"{needed} is not in this service's capability bounding set (systemd: "
                                      f"add it to CapabilityBoundingSet= with a drop-in)")


CAP_SETPCAP = 8


def _bounding_set() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapBnd:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return None


def resolve_plugin_users(config: Config) -> PluginUsers:
    """Look every user up once; a missing user is a config error naming its key (exit 78)."""
    check_capability_grants(config)
    if os.geteuid() != 0:
        return PluginUsers(None, {})
    default = _lookup(config.jobs.run_as_user, "jobs.run_as_user")
    if default[0] == 0:
        raise ConfigError(f"key jobs.run_as_user: {config.jobs.run_as_user!r} is root; plugins must not run as "
                          f"root by default (a plugin that needs it gets an entry in jobs.plugin_users)")
    exceptions: dict[str, Ids] = {}
    for plugin, user in config.jobs.plugin_users.items():
        ids = _lookup(user, f"jobs.plugin_users.{plugin}")
        exceptions[plugin] = None if ids[0] == 0 else ids  # root: keep our own credentials
    return PluginUsers(default, exceptions)


def _lookup(user: str, key: str) -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"key {key}: user {user!r} does not exist (create it, or name an existing user)") from None
    return pw.pw_uid, pw.pw_gid
