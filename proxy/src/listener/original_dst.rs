//! `SO_ORIGINAL_DST`: where a connection redirected by `remora-proxy init` (iptables
//! `REDIRECT`) was going before the redirect. The kernel's conntrack keeps it; the socket's own
//! local address is the proxy's port.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use tokio::net::TcpStream;

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST`
/// (linux/netfilter_ipv6/ip6_tables.h) share the number.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The address the client connected to before a redirect, or `None` when the connection was
/// not redirected (explicit-proxy mode: no conntrack entry, or the original destination is the
/// listener itself).
pub(crate) fn original_dst(tcp: &TcpStream) -> Option<SocketAddr> {
    let local = tcp.local_addr().ok()?;
    let orig = lookup(tcp, local.is_ipv6())?;
    (orig != local).then_some(orig)
}

fn lookup(tcp: &TcpStream, v6: bool) -> Option<SocketAddr> {
    let fd = tcp.as_raw_fd();
    if v6 {
        // SAFETY: getsockopt writes at most `len` bytes into the zeroed sockaddr_in6.
        let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                SO_ORIGINAL_DST,
                (&mut sa as *mut libc::sockaddr_in6).cast(),
                &mut len,
            )
        };
        if rc != 0 || sa.sin6_family != libc::AF_INET6 as libc::sa_family_t {
            return None;
        }
        let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
        // A dual-stack socket reports IPv4 clients' destinations as IPv4-mapped addresses.
        let addr = SocketAddrV6::new(ip, u16::from_be(sa.sin6_port), 0, sa.sin6_scope_id);
        return Some(match ip.to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, addr.port())),
            None => SocketAddr::V6(addr),
        });
    }
    // SAFETY: as above, with a sockaddr_in.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut sa as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 || sa.sin_family != libc::AF_INET as libc::sa_family_t {
        return None;
    }
    let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
    Some(SocketAddr::V4(SocketAddrV4::new(
        ip,
        u16::from_be(sa.sin_port),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a redirect there is no original destination (loopback, no conntrack NAT).
    #[tokio::test]
    async fn a_direct_connection_has_none() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        let (_c, (s, _)) = (c.unwrap(), s.unwrap());
        assert_eq!(original_dst(&s), None);
    }
}
