"""``posctl keys``: the CURVE certificates a tcp:// endpoint needs, with the right modes.

The files are the ones :func:`zmq.auth.create_certificates` writes and both the daemon
(:mod:`positiond.curve`) and the client read: ``NAME.key`` (public) and ``NAME.key_secret``
(public and secret). pyzmq writes them with the process umask, so they are made inside a private
temporary directory, given their modes there, then linked into place: a secret is never readable
by others, not even for a moment, and an existing file is never overwritten. The layout, in DIR::

    server.key_secret   0600 (0640 with --group)  the daemon's certificate: curve_secret_key
    server.key          0644                      its public half, for the strategy hosts
    clients/            0700 (0750 with --group)  curve_clients: the public keys it admits
        NAME.key        0644
    NAME/               0700                      what strategy host NAME needs: copy it there,
        server.key      0644                      then delete it here
        NAME.key_secret 0600
"""

from __future__ import annotations

import argparse
import grp
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import zmq.auth

from positiond.ctl.access import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, Ctl, CtlError
from positiond.curve import CurveError, load_public, load_secret

__all__ = ["add_arguments", "cmd_keys"]

SERVER = "server"
CLIENTS = "clients"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def add_arguments(sub: argparse.ArgumentParser) -> None:
    """The ``keys`` command's arguments."""
    sub.add_argument("dir", metavar="DIR", type=Path, help="where the keys go (created if needed)")
    sub.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="NAME",
        help="make a certificate for strategy host NAME (repeatable)",
    )
    sub.add_argument(
        "--group",
        metavar="GROUP",
        help="the daemon's group (positiond under systemd): may read the server certificate "
        "and the clients directory",
    )


def _gid(group: str | None) -> int | None:
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise CtlError(EXIT_USAGE, f"no group {group!r}") from None


def _directory(path: Path, gid: int | None) -> None:
    """A new directory only its owner (and ``gid``) may enter; an existing one keeps its mode,
    plus entry for ``gid`` (DIR may be /etc/positiond itself: never close it to others)."""
    try:
        path.mkdir(mode=0o700, parents=True)
        mode = 0o700
    except FileExistsError:
        if not path.is_dir():
            raise
        mode = path.stat().st_mode & 0o7777
    if gid is not None:
        os.chown(path, -1, gid)
        mode |= 0o050
    path.chmod(mode)


def _certificate(where: Path, name: str, secret_mode: int) -> tuple[Path, Path]:
    """A fresh key pair as ``where/.keys-*/name.key[_secret]``, modes already set."""
    tmp = Path(tempfile.mkdtemp(prefix=".keys-", dir=where))  # 0700: nobody else looks in
    public, secret = (Path(p) for p in zmq.auth.create_certificates(tmp, name))
    public.chmod(0o644)
    secret.chmod(secret_mode)
    return public, secret


def _place(source: Path, target: Path) -> None:
    """Link ``source`` to ``target``; never replaces an existing file."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise CtlError(EXIT_REFUSED, f"{target} exists: not replaced") from None


def _server(root: Path, gid: int | None) -> tuple[Path, Path, bool]:
    secret, public = root / f"{SERVER}.key_secret", root / f"{SERVER}.key"
    created = False
    if not secret.exists() and not public.exists():
        made_public, made_secret = _certificate(root, SERVER, 0o600)
        try:
            _place(made_secret, secret)
            _place(made_public, public)
        finally:
            shutil.rmtree(made_public.parent)
        created = True
    try:
        # Kept as it is: a new server key would lock out every client that has the old one.
        if load_secret(secret)[0] != load_public(public):
            raise CtlError(EXIT_REFUSED, f"{public} is not the public half of {secret}")
    except CurveError as exc:
        raise CtlError(EXIT_REFUSED, f"{exc}; remove both server files to make new ones") from None
    if gid is not None:
        os.chown(secret, -1, gid)
    secret.chmod(0o640 if gid is not None else 0o600)
    return public, secret, created


def _client(root: Path, name: str, server_public: Path) -> dict[str, str]:
    bundle, allowed = root / name, root / CLIENTS / f"{name}.key"
    if allowed.exists() or bundle.exists():
        raise CtlError(
            EXIT_REFUSED,
            f"client {name!r} exists ({allowed if allowed.exists() else bundle}); remove "
            f"{allowed} (and {bundle}) to replace it",
        )
    public, secret = _certificate(root, name, 0o600)
    try:
        bundle.mkdir(mode=0o700)
        bundle.chmod(0o700)
        _place(secret, bundle / secret.name)
        shutil.copyfile(server_public, bundle / server_public.name)
        (bundle / server_public.name).chmod(0o644)
        _place(public, allowed)  # last: the daemon admits it only once the bundle is complete
    finally:
        shutil.rmtree(public.parent)
    return {
        "name": name,
        "public": str(allowed),
        "secret": str(bundle / secret.name),
        "copy": str(bundle),
    }


def cmd_keys(ctl: Ctl, args: argparse.Namespace) -> int:
    """Make the CURVE certificates a tcp:// endpoint needs: the daemon's (once; an existing one
    is kept) and one per --client NAME, each with the right modes.

    In DIR: server.key_secret (0600; 0640 and group GROUP with --group) is the daemon's
    curve_secret_key; clients/ (0700; 0750 with --group) is its curve_clients, one public
    NAME.key per strategy host it admits; NAME/ (0700) holds what host NAME needs — server.key
    (for curve_server_key) and NAME.key_secret (0600, for curve_client_cert): copy that
    directory to the host, then delete it here. A client name that exists is refused, never
    replaced. The daemon reads clients/ when it starts: restart it after adding or removing a
    key. Step by step: docs/REMOTE.md.
    """
    for name in args.client:
        if not NAME.fullmatch(name) or name in (SERVER, CLIENTS):
            raise CtlError(
                EXIT_USAGE,
                f"client name {name!r}: letters, digits, '.', '_', '-' (at most 64), "
                f"not {SERVER!r} or {CLIENTS!r}",
            )
    if len(set(args.client)) != len(args.client):
        raise CtlError(EXIT_USAGE, "a client name is given twice")
    gid = _gid(args.group)
    root: Path = args.dir.absolute()
    try:
        _directory(root, gid)
        _directory(root / CLIENTS, gid)
        public, secret, created = _server(root, gid)
        clients = [_client(root, name, public) for name in args.client]
    except OSError as exc:
        raise CtlError(EXIT_USAGE, f"cannot write the keys in {root}: {exc}") from None
    result: dict[str, Any] = {
        "dir": str(root),
        "server": {"public": str(public), "secret": str(secret), "created": created},
        "curve_clients": str(root / CLIENTS),
        "clients": clients,
    }
    if ctl.json:
        ctl.emit(result)
        return EXIT_OK
    say = ctl.out.print
    state = "made" if created else "kept (it exists)"
    say(f"daemon certificate {state}:", markup=False)
    say(f'  curve_secret_key = "{secret}"', markup=False)
    say(f'  curve_clients = "{root / CLIENTS}"', markup=False)
    say(f"  public half for the strategy hosts: {public}", markup=False)
    for client in clients:
        say(f"client {client['name']}: admitted by {client['public']}", markup=False)
        say(f"  copy {client['copy']}/ to host {client['name']}, then delete it here", markup=False)
    if clients:
        say("Restart the daemon so it reads the new client keys.", markup=False)
    return EXIT_OK
