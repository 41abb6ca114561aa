# kodepipe's egress relay: the guest's end (kodepipe/egress/relay.py is the host's, mux.py the framing).
#
# Run as root inside a container's network namespace, before the agent starts:
#     nsenter --net=/proc/PID/ns/net -- perl -e "$(cat relay.pl)"
# It listens on 127.0.0.1:3128/tcp and 127.0.0.1:53/udp (and on ::1 when the namespace has it) and
# carries each connection and each datagram, as frames, over its stdin and stdout (an SSH channel to
# the host, where kodepipe's egress proxy decides).  It resolves nothing and connects nowhere itself.
# It exits when its stdin ends (kp-run or SSH went away): its sockets close, and the namespace is left
# with a loopback interface and nothing listening on it.  A frame that breaks the rules ends it too.
# Every buffer is bounded: at most WINDOW bytes per stream and direction, MAXS streams, MAXDNS queries.
# Only perl-base (Essential in Debian): Socket, Fcntl, Errno and builtins.
use strict;
use warnings;
use Socket qw(AF_INET AF_INET6 SOCK_STREAM SOCK_DGRAM SOL_SOCKET SO_REUSEADDR IPPROTO_IPV6 IPV6_V6ONLY
              inet_pton pack_sockaddr_in pack_sockaddr_in6);
use Fcntl qw(F_GETFL F_SETFL O_NONBLOCK);
use Errno qw(EAGAIN EINTR EWOULDBLOCK);

my ($READY, $OPEN, $DATA, $EOF, $CLOSE, $CREDIT, $DNS) = (1 .. 7);
my ($MAXP, $WINDOW, $MAXS, $MAXDNS, $HEADER) = (16384, 262144, 256, 64, 7);
$SIG{PIPE} = 'IGNORE';    # a client gone mid-write is an error to handle, not a death
binmode STDIN;
binmode STDOUT;

sub nonblocking {
    my ($fh) = @_;
    my $flags = fcntl($fh, F_GETFL, 0) or die "relay: fcntl: $!\n";
    fcntl($fh, F_SETFL, $flags | O_NONBLOCK) or die "relay: fcntl: $!\n";
}

my (@tcp, @udp, @ready);
for my $where (['127.0.0.1', AF_INET], ['::1', AF_INET6]) {
    my ($addr, $family) = @$where;
    my $ip = inet_pton($family, $addr);
    my $at = sub { $family == AF_INET ? pack_sockaddr_in($_[0], $ip) : pack_sockaddr_in6($_[0], $ip) };
    my ($t, $u);
    my $v4 = $family == AF_INET;
    # ::1 is optional: the namespace may have no IPv6 at all
    if (!socket($t, $family, SOCK_STREAM, 0)) { die "relay: socket: $!\n" if $v4; next }
    setsockopt($t, IPPROTO_IPV6, IPV6_V6ONLY, 1) if !$v4;
    setsockopt($t, SOL_SOCKET, SO_REUSEADDR, 1) or die "relay: setsockopt: $!\n";
    if (!bind($t, $at->(3128))) { die "relay: bind $addr:3128: $!\n" if $v4; close $t; next }
    listen($t, 512) or die "relay: listen: $!\n";
    socket($u, $family, SOCK_DGRAM, 0) or die "relay: socket: $!\n";
    setsockopt($u, IPPROTO_IPV6, IPV6_V6ONLY, 1) if !$v4;
    bind($u, $at->(53)) or die "relay: bind $addr:53/udp: $!\n";
    nonblocking($_) for $t, $u;
    push @tcp, $t;
    push @udp, $u;
    push @ready, "$addr:3128/tcp", "$addr:53/udp";
}

sub out {    # blocking: the host always reads, so this cannot wait on the host waiting on us
    my ($buf) = @_;
    while (length $buf) {
        my $n = syswrite(STDOUT, $buf);
        if (!defined $n) { next if $! == EINTR; exit 0 }    # the host is gone
        substr($buf, 0, $n, '');
    }
}

sub frame { my ($kind, $id, $payload) = @_; $payload //= ''; out(pack('CNn', $kind, $id, length $payload) . $payload) }

my %streams;    # id => {fh, credit (bytes the host may still be sent), out (for the client), eof_in, shut, eof_sent, closing}
my $next = 1;
my %queries;    # id => [socket, the client's address]
my $query = 0;
my $in = '';

sub drop {
    my ($id, $tell) = @_;
    my $s = delete $streams{$id} or return;
    close $s->{fh};
    frame($CLOSE, $id) if $tell;
}

sub flushed {    # nothing is left for the client: pass on the host's EOF or CLOSE
    my ($id, $s) = @_;
    return if length $s->{out};
    if ($s->{closing}) { drop($id, 0); return }
    if ($s->{eof_in} && !$s->{shut}) { shutdown($s->{fh}, 1); $s->{shut} = 1 }
}

sub from_host {
    while (length($in) >= $HEADER) {
        my ($kind, $id, $len) = unpack('CNn', $in);
        die "relay: a frame of kind $kind from the host\n" if $kind < $DATA || $kind > $DNS;
        die "relay: a frame of $len bytes from the host\n" if $len > $MAXP;
        return if length($in) < $HEADER + $len;
        my $payload = substr($in, $HEADER, $len);
        substr($in, 0, $HEADER + $len, '');
        if ($kind == $DNS) {
            my $q = delete $queries{$id} or die "relay: a DNS answer to no query ($id)\n";
            send($q->[0], $payload, 0, $q->[1]) if length $payload;    # empty: no answer
            next;
        }
        die "relay: a frame for stream $id, which was never opened\n" if $id == 0 || $id >= $next;
        my $s = $streams{$id} or next;    # closed here while the host was still sending: stale
        if ($kind == $DATA) {
            die "relay: an empty DATA frame\n" if !$len;
            die "relay: DATA beyond the window on stream $id\n" if $s->{eof_in} || length($s->{out}) + $len > $WINDOW;
            $s->{out} .= $payload;
        } elsif ($kind == $EOF) {
            die "relay: a malformed EOF on stream $id\n" if $len || $s->{eof_in};
            $s->{eof_in} = 1;
            flushed($id, $s);
        } elsif ($kind == $CLOSE) {
            die "relay: a malformed CLOSE on stream $id\n" if $len;
            $s->{closing} = 1;
            flushed($id, $s);
        } else {
            die "relay: a malformed CREDIT on stream $id\n" if $len != 4;
            my $n = unpack('N', $payload);
            die "relay: a CREDIT of $n on stream $id\n" if !$n || $s->{credit} + $n > $WINDOW;
            $s->{credit} += $n;
        }
    }
}

frame($READY, 0, join(' ', @ready));
while (1) {
    my ($r, $w) = ('', '');
    vec($r, fileno(STDIN), 1) = 1;
    if (keys(%streams) < $MAXS) { vec($r, fileno($_), 1) = 1 for @tcp }
    vec($r, fileno($_), 1) = 1 for @udp;
    for my $s (values %streams) {
        vec($r, fileno($s->{fh}), 1) = 1 if $s->{credit} > 0 && !$s->{eof_sent} && !$s->{closing};
        vec($w, fileno($s->{fh}), 1) = 1 if length $s->{out};
    }
    my ($rr, $wr) = ($r, $w);
    if (select($rr, $wr, undef, undef) < 0) { next if $! == EINTR; die "relay: select: $!\n" }
    if (vec($rr, fileno(STDIN), 1)) {
        my $n = sysread(STDIN, $in, 65536, length $in);
        if (!defined $n) { next if $! == EINTR || $! == EAGAIN; exit 0 }
        exit 0 if !$n;    # the host is gone: so are our sockets
        from_host();
    }
    for my $t (@tcp) {
        next if !vec($rr, fileno($t), 1);
        while (keys(%streams) < $MAXS) {
            accept(my $c, $t) or last;
            nonblocking($c);
            my $id = $next++;
            $streams{$id} = {fh => $c, credit => $WINDOW, out => '', eof_in => 0, shut => 0, eof_sent => 0, closing => 0};
            frame($OPEN, $id);
        }
    }
    for my $u (@udp) {
        next if !vec($rr, fileno($u), 1);
        while (defined(my $peer = recv($u, my $d, 65536, 0))) {
            next if length($d) < 12 || length($d) > $MAXP || keys(%queries) >= $MAXDNS;    # dropped: the client retries
            $query = $query % 4294967295 + 1;
            next if exists $queries{$query};
            $queries{$query} = [$u, $peer];
            frame($DNS, $query, $d);
        }
    }
    for my $id (keys %streams) {
        my $s = $streams{$id} or next;
        my $fd = fileno($s->{fh});
        if (vec($wr, $fd, 1) && length $s->{out}) {
            my $n = syswrite($s->{fh}, $s->{out});
            if (defined $n) {
                substr($s->{out}, 0, $n, '');
                frame($CREDIT, $id, pack('N', $n)) if !$s->{closing};
                flushed($id, $s);
                next if !$streams{$id};
            } elsif ($! != EAGAIN && $! != EWOULDBLOCK && $! != EINTR) {
                drop($id, 1);
                next;
            }
        }
        next if !vec($rr, $fd, 1) || $s->{credit} <= 0 || $s->{eof_sent} || $s->{closing};
        my $n = sysread($s->{fh}, my $d, $s->{credit} < $MAXP ? $s->{credit} : $MAXP);
        if (!defined $n) { drop($id, 1) if $! != EAGAIN && $! != EWOULDBLOCK && $! != EINTR; next }
        if (!$n) { $s->{eof_sent} = 1; frame($EOF, $id); next }
        $s->{credit} -= $n;
        frame($DATA, $id, $d);
    }
}
