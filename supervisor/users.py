"""Which user a job's plugin runs as (SPEC §6): run_as_user when we are root, ourselves
otherwise; a per-plugin exception only through the local config (`jobs.plugin_users`),
never from a spec, since specs may come from the network."""

from __future__ import annotations

import os
import pwd

from supervisor.config import Config, ConfigError

Ids = tuple[int, int] | None  # (uid, gid) to switch to; None: stay who we are


class PluginUsers:
    def __init__(self, default: Ids, exceptions: dict[str, Ids]):
        self.default = default
        self.exceptions = exceptions

    def for_plugin(self, name: str, version: str) -> Ids:
        """`name@version` in plugin_users first, then `name`, then run_as_user."""
        for key in (f"{name}@{version}", name):
            if key in self.exceptions:
                return self.exceptions[key]
        return self.default


def resolve_plugin_users(config: Config) -> PluginUsers:
    """Look every user up once; a missing user is a config error naming its key (exit 78)."""
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
