"""argparse pieces shared by rdpt's commands."""

from __future__ import annotations

import argparse


class OverridesParser(argparse.ArgumentParser):
    """Accepts `dotted.key=value` overrides anywhere, also after options.

    argparse consumes the positionals (CONFIG and the overrides) in one go, so
    `rdpt submit train CONFIG --nodes 2 run.name=x` would leave `run.name=x` unrecognized.
    """

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        rest = []
        for arg in extras:
            if "=" in arg and not arg.startswith("-") and hasattr(ns, "overrides"):
                ns.overrides.append(arg)
            else:
                rest.append(arg)
        return ns, rest
