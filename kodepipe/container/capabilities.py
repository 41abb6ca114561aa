"""The capabilities --cap-add may give back (the policy's, kodepipe.container.policy).  Apart so
that kp-run's option table can name them without importing the policy module at start-up."""

CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE", "NET_RAW",
                "SETGID", "SETUID", "SETPCAP", "SYS_CHROOT", "AUDIT_WRITE", "MKNOD")
