#!/bin/sh
# Re-captures the real strace fixtures in this folder (strace 6.1, Debian 12).
# Regenerate the expected output afterwards and READ the diff:
#   .venv/bin/python -m tests.test_strace --bless
# Noisy loader syscalls are left out with -e trace=!... to keep the files small;
# the lines themselves are exactly what strace printed.
set -eu
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
work=$(mktemp -d /tmp/kp-fixture.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
base="-ttt -T -yy -s 256"
quiet='trace=!mmap,mprotect,munmap,brk,pread64,arch_prctl,set_tid_address,set_robust_list,rseq,prlimit64,getrandom,rt_sigaction,rt_sigprocmask,futex,newfstatat,lseek,ioctl,fcntl,getdents64,access,readlink,sysinfo,getuid,geteuid,getgid,getegid,getpid,getppid,uname,close,dup2,sigaltstack,poll'
gcc -O1 -pthread -o threads "$here/src/threads.c"
gcc -O1 -o seccomp "$here/src/seccomp.c"

# a shell pipeline, strace writing to stderr ("[pid N]" prefixes)
strace -f $base -e "$quiet" sh -c 'echo "hello world" | tr a-z A-Z > out.txt; wc -c < out.txt; rm out.txt' \
  2> "$here/shell.strace" >/dev/null

# git init and commit in a fresh repository
strace -f $base -e "$quiet" -o git.raw sh -c 'git init -q repo && cd repo && echo x > f && git add f &&
  git -c user.name=kp -c user.email=kp@example.invalid commit -qm init' >/dev/null
head -n 200 git.raw > "$here/git.strace"

# python writing, renaming, chmod-ing and removing files, with every escape in the data
strace -f $base -e "$quiet" -o py.raw /usr/bin/python3 -I -S -c '
import os
open("a.txt", "w").write("tab\there \"quoted\" back\\slash \x01\x7f é\n" * 20)
os.rename("a.txt", "b.txt"); os.mkdir("d"); os.chmod("b.txt", 0o600)
os.symlink("b.txt", "c"); os.unlink("c"); os.rmdir("d")
try: open("/nonexistent/x")
except OSError: pass'
{ head -n 1 py.raw; sed -n '/openat(.*"a.txt"/,$p' py.raw; } > "$here/python-files.strace"

# network attempts: closed TCP ports on IPv4 and IPv6, UDP sendto, bind+listen, a unix socket
strace -f $base -e "$quiet" -o net.raw /usr/bin/python3 -I -S -c '
import socket
for fam, addr in ((socket.AF_INET, ("127.0.0.1", 9)), (socket.AF_INET6, ("::1", 9, 0, 0))):
    s = socket.socket(fam)
    try: s.connect(addr)
    except OSError: pass
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.sendto(b"ping\0", ("127.0.0.1", 9))
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen()
c = socket.create_connection(l.getsockname()); a, _ = l.accept(); c.send(b"x"); a.recv(1)
x = socket.socket(socket.AF_UNIX)
try: x.connect("/nonexistent.sock")
except OSError: pass'
{ head -n 1 net.raw; sed -n '/socket(/,$p' net.raw; } > "$here/net.strace"

# threads writing a file, then a thread that execs (the leader is superseded)
strace -f $base -o "$here/threads.strace" ./threads exec >/dev/null

# denied operations: a process with its own seccomp filter (EPERM, then SIGSYS),
# and an unprivileged user reading root's files
strace -f $base -e "$quiet" -o "$here/denied.strace" sh -c './seccomp; setpriv --reuid=65534 --regid=65534 --clear-groups sh -c "cat /root/.bashrc; touch /etc/kp-denied"' 2>/dev/null || true

# the minimal and default capture modes of kp-trace, with a kill and a killed child
strace -f $base --seccomp-bpf -e trace=%process -o "$here/minimal.strace" \
  sh -c 'sleep 5 & kill -9 $!; wait; ls / > /dev/null; exit 3' || true
strace -f $base --seccomp-bpf -e 'trace=%process,%file,%network,kill,tkill,tgkill' -o "$here/default.strace" \
  sh -c 'cat /etc/hostname > copy.txt; ./seccomp; exit 0' 2>/dev/null || true

# attaching to a running process and detaching on SIGINT
sh -c 'while :; do sleep 0.05; done' & loop=$!
timeout -s INT 0.3 strace -f $base -p $loop 2> attach.raw || true
{ head -n 120 attach.raw; tail -n 4 attach.raw; } > "$here/attach.strace"
kill $loop
