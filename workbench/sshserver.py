"""A real SSH server on loopback (asyncssh) that runs real shell commands: for tests and self-checks.

Host and client keys are generated per server; the client side gets a known_hosts file pinning the host
key, so connections are verified exactly as against a remote machine.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from workbench.cluster import HostSpec, free_port


async def _run_command(process: asyncssh.SSHServerProcess) -> None:
    """Run the requested command in a shell, as sshd would, with the client's stdin (a secret is sent there,
    never on a command line), and return its output and exit status. stdin is read to its end first: a
    client sends its input and EOF (``Host.run`` sends EOF at once when it has no input)."""
    data = await process.stdin.read()
    local = await asyncio.create_subprocess_shell(process.command or "true", stdin=asyncio.subprocess.PIPE,
                                                  stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await local.communicate(data.encode())
    process.stdout.write(out.decode(errors="replace"))
    process.stderr.write(err.decode(errors="replace"))
    process.exit(local.returncode or 0)


@dataclass
class LoopbackSSH:
    port: int
    key_file: Path
    known_hosts: Path
    server: asyncssh.SSHAcceptor

    def host(self, name: str, workdir: str, python: str) -> HostSpec:
        return HostSpec(name=name, address="127.0.0.1", port=self.port, user="block", key_file=str(self.key_file),
                        known_hosts=str(self.known_hosts), workdir=workdir, python=python)

    async def close(self) -> None:
        self.server.close()
        with contextlib.suppress(Exception):
            await self.server.wait_closed()


async def start_loopback_ssh(folder: Path) -> LoopbackSSH:
    folder.mkdir(parents=True, exist_ok=True)
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    key_file = folder / "client_key"
    client_key.write_private_key(str(key_file))
    key_file.chmod(0o600)
    port = free_port()
    (folder / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key.export_public_key().decode().strip()}\n")
    authorized = asyncssh.import_authorized_keys(client_key.export_public_key().decode())
    server = await asyncssh.create_server(asyncssh.SSHServer, "127.0.0.1", port, server_host_keys=[host_key],
                                          authorized_client_keys=authorized, process_factory=_run_command)
    return LoopbackSSH(port, key_file, folder / "known_hosts", server)
