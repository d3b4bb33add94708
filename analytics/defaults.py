"""Defaults of the experiment analysis that the ``analyze`` command shows in its help, kept apart from ``report``
so that loading the CLI does not import pandas and scipy."""

# Below this many users per arm the normal approximations behind every interval are not trustworthy, so the report
# shows how many more users are needed instead of an interval. ``analyze(min_users_per_arm=...)`` overrides it.
DEFAULT_MIN_USERS_PER_ARM = 100
