"""kp-stop: shut VMs down, or suspend, resume and save them."""

from __future__ import annotations

import click

from kodepipe.commands import cli as kpcli
from kodepipe.commands import options, vmargs


@click.command(context_settings=options.CONTEXT, epilog=options.EPILOG)
@click.argument("names", nargs=-1, metavar="[NAME]...", shell_complete=kpcli.name_completion(("vm",)))
@click.option("--suspend", "mode", flag_value="suspend", help="Freeze the VM in place (QMP stop): its processes "
              "keep their state and it uses no CPU. State 'suspended'.")
@click.option("--resume", "mode", flag_value="resume", help="Thaw a suspended VM (QMP cont), or a frozen one where "
              "QEMU allows it: after a cut-off --save (the save is cancelled), or a full disk once space is free.")
@click.option("--save", "mode", flag_value="save", help="Save the running VM's RAM to its folder and end QEMU: "
              "state 'saved', survives a host reboot; kp-boot resumes it where it was.")
@click.option("--kill", "mode", flag_value="kill", help="End QEMU at once (SIGTERM, then SIGKILL), no shutdown.")
@click.option("-t", "--timeout", default=60.0, show_default=True, type=options.FiniteRange(1, 3600),
              help="Seconds for a graceful shutdown (or a save) before kodepipe kills QEMU.")
@options.quiet
def cli(names: tuple[str, ...], mode: str | None, timeout: float, quiet: bool) -> int:
    """Shut VMs down cleanly, from NAMEs or the vm records on stdin.

    By default: asks the guest agent to power the guest off, then presses
    the ACPI power button, then kills QEMU once --timeout has passed; the
    record says which worked ("stopped_by").  The VM's disk is kept:
    kp-boot starts it again.  A VM that is not running passes through.

    \b
    Examples:
      kp-stop proj
      kp-stop --suspend proj && kp-stop --resume proj
      kp-ls --kind vm --state running | kp-stop --save
    """
    from kodepipe.core.state import Store
    from kodepipe.vm import lifecycle

    out = kpcli.Output("kp-stop", quiet=quiet)
    store = Store()

    def act(name: str, expect_id: str | None, record: dict[str, object]) -> dict[str, object]:
        if mode in ("suspend", "resume"):
            return lifecycle.pause(store, name, resume=mode == "resume", expect_id=expect_id)
        if mode == "save":
            out.progress(f"{name}: saving its state")
            return lifecycle.save(store, name, timeout=timeout, expect_id=expect_id, say=out.warn)
        if mode == "kill":
            result, how = lifecycle.stop(store, name, timeout=timeout, graceful=False, expect_id=expect_id,
                                       say=out.warn)
            return {**result, "stopped_by": how}
        out.progress(f"{name}: shutting down")
        result, how = lifecycle.stop(store, name, timeout=timeout, expect_id=expect_id, say=out.warn)
        if how == "killed":
            out.warn(f"{name}: did not shut down within {timeout:g} s; QEMU was killed")
        return {**result, "stopped_by": how}

    return vmargs.run_each(out, names, act)


def main() -> None:
    kpcli.run(cli, "kp-stop")
