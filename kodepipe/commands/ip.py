"""kp-ip: wait for booted VMs and find their addresses."""

from __future__ import annotations

import click

from kodepipe.commands import cli as kpcli
from kodepipe.commands import options, vmargs


@click.command(context_settings=options.CONTEXT, epilog=options.EPILOG)
@click.argument("names", nargs=-1, metavar="[NAME]...", shell_complete=kpcli.name_completion(("vm",)))
@click.option("-t", "--timeout", default=300.0, show_default=True, type=options.FiniteRange(1, 3600),
              help="Seconds to wait for each VM (a cold boot under TCG takes 30-60 s).")
@options.quiet
def cli(names: tuple[str, ...], timeout: float, quiet: bool) -> int:
    """Wait for running VMs and add their addresses and SSH endpoint.

    Asks each VM's QEMU guest agent (guest-network-get-interfaces), so it
    works whatever the network mode, and says so in "address_source".  Also
    learns the guest's SSH host key through the agent, a channel only the
    host can reach, and writes it to the VM's known_hosts for kp-ssh; then
    waits until SSH answers on the "ssh" endpoint.  With --share, mounts the
    shared directory at /workspace.

    On timeout, exits 75 with the last lines of the serial console.

    \b
    Examples:
      kp-clone base proj | kp-boot | kp-ip
      kp-ip proj | jq -r .address
    """
    from kodepipe.core.state import Store
    from kodepipe.vm import address

    out = kpcli.Output("kp-ip", quiet=quiet)
    store = Store()

    def act(name: str, expect_id: str | None, record: dict[str, object]) -> dict[str, object]:
        out.progress(f"{name}: waiting for the guest agent")
        found = address.find(store, name, timeout=timeout, expect_id=expect_id)
        out.progress(f"{name}: {found.get('address')} (ssh {found.get('ssh')}) after {found.get('waited_seconds')} s")
        return found

    return vmargs.run_each(out, names, act)


def main() -> None:
    kpcli.run(cli, "kp-ip")
