"""What kodepipe's seccomp profile refuses holds on both backends (seccomp.render, one function,
applied to the host's containers profile and to the guest's): an agent tries, from a real container
on the host and in a real VM, to make a child hidden from a tracer (clone with CLONE_UNTRACED, and
clone3, whose flags seccomp cannot see), to use the kernel keyring (not namespaced: its quota is a
host account's) and to make a user namespace; ordinary children still work.  Run once against a
kp-run whose profile is Podman's own, the attempts succeed, so the test can tell."""

from __future__ import annotations

import pytest

from tests.integration.vmbackend import kprun_on

pytestmark = pytest.mark.integration

# perl, because python3-minimal has no ctypes; x86_64 syscall numbers
ATTEMPTS = r"""
$| = 1;
my ($type, $desc, $data) = ("user", "kp", "x");  # syscall passes strings by pointer: they must be writable
sub said { my ($what, $r) = @_; print "$what: ", ($r < 0 ? "errno " . ($! + 0) : "ok"), "\n" }
my $pid = syscall(56, 0x00800000 | 17, 0, 0, 0, 0);  # clone(CLONE_UNTRACED | SIGCHLD)
if ($pid == 0) { exit 0 }
waitpid($pid, 0) if $pid > 0;
said("clone-untraced", $pid);
my $args = pack("Q*", 0x00800000, 0, 0, 0, 17, 0, 0, 0, 0, 0, 0);  # struct clone_args
my $r = syscall(435, $args, length($args));
if ($r == 0) { exit 0 }
waitpid($r, 0) if $r > 0;
said("clone3", $r);
said("keyctl", syscall(250, 1, 0));  # KEYCTL_JOIN_SESSION_KEYRING
said("add_key", syscall(248, $type, $desc, $data, 1, -3));  # into KEY_SPEC_SESSION_KEYRING
said("request_key", syscall(249, $type, $desc, 0, 0));
said("unshare-user", syscall(272, 0x10000000));  # CLONE_NEWUSER
my $f = fork();
if ($f == 0) { exit 7 }
waitpid($f, 0);
print "fork: ", $? >> 8, "\n";
"""
EXPECTED = ["clone-untraced: errno 1", "clone3: errno 38", "keyctl: errno 38", "add_key: errno 38",
            "request_key: errno 38", "unshare-user: errno 1", "fork: 7"]
# kp-run whose seccomp profile is the base one, unchanged (Podman's default), for the tests' own sake
WEAKENED = "from kodepipe.container import seccomp\nseccomp.derive = lambda base: dict(base)\n"


@pytest.mark.parametrize("backend", ["host", "vm"])
def test_untraced_children_keys_and_namespaces_are_refused(request: pytest.FixtureRequest, shell_image: str,
                                                            backend: str) -> None:
    proc, record = kprun_on(request, backend, "--image", shell_image, "--", "perl", "-e", ATTEMPTS)
    assert record["exit_code"] == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if ": " in line]
    for expected in EXPECTED:
        assert expected in said, proc.stderr[-3000:]


@pytest.mark.parametrize("backend", ["host", "vm"])
def test_the_attempts_succeed_under_podmans_own_profile(request: pytest.FixtureRequest, shell_image: str,
                                                        backend: str) -> None:
    proc, record = kprun_on(request, backend, "--image", shell_image, "--", "perl", "-e", ATTEMPTS,
                            weakened=WEAKENED)
    assert record["exit_code"] == 0, proc.stderr[-3000:]
    assert "clone-untraced: ok" in proc.stderr, proc.stderr[-3000:]
    assert "fork: 7" in proc.stderr


# the limits of the container's own user namespace, as the agent reads them
QUOTAS = "echo inotify=$(cat /proc/sys/user/max_inotify_instances) userns=$(cat /proc/sys/user/max_user_namespaces)"
# kp-run that does not set them (on the host: no nsenter; in a VM: no hook)
WEAKENED_QUOTAS = ("from kodepipe.container import userns, vmrun\nuserns.limit = lambda pid, values: None\n"
                   "vmrun.VmRun.prepare_hook = lambda self, values: (None, b\"\")\n")


@pytest.mark.parametrize("weakened", [False, True], ids=["kp-run", "weakened"])
@pytest.mark.parametrize("backend", ["host", "vm"])
def test_the_user_namespace_has_its_share_of_the_kernel_quotas(request: pytest.FixtureRequest, shell_image: str,
                                                               backend: str, weakened: bool) -> None:
    proc, record = kprun_on(request, backend, "--image", shell_image, "--", "sh", "-c", QUOTAS,
                            weakened=WEAKENED_QUOTAS if weakened else "")
    assert record["exit_code"] == 0, proc.stderr[-3000:]
    quotas = record["kernel_quotas"]
    held = f"inotify={quotas['inotify_instances']} userns=0" in proc.stderr
    assert held != weakened, proc.stderr[-3000:]
