"""One module per kp-* command; each exposes ``cli`` (click) and ``main``.

``COMMANDS`` maps program names to modules, for the docs generator and bin/.
"""

COMMANDS = {
    "kp-image": "kodepipe.commands.image",
    "kp-clone": "kodepipe.commands.clone",
    "kp-ls": "kodepipe.commands.ls",
    "kp-boot": "kodepipe.commands.boot",
    "kp-ip": "kodepipe.commands.ip",
    "kp-stop": "kodepipe.commands.stop",
    "kp-ssh": "kodepipe.commands.ssh",
    "kp-attach": "kodepipe.commands.attach",
    "kp-rm": "kodepipe.commands.rm",
    "kp-trace": "kodepipe.commands.trace",
    "kp-run": "kodepipe.commands.run",
    "kp-review": "kodepipe.commands.review",
    "kp-disk": "kodepipe.commands.disk",
    "kp-pool": "kodepipe.commands.pool",
}
