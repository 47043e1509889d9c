//! A real `redis-server` on a loopback address of the test's own, stopped and started again on
//! the same address when a test needs an outage.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{TempDir, unique_loopback};

pub struct Redis {
    child: Option<Child>,
    pub addr: SocketAddr,
    password: Option<String>,
    dir: TempDir,
}

fn binary() -> &'static str {
    if std::path::Path::new("/usr/bin/redis-server").exists() {
        "/usr/bin/redis-server"
    } else {
        "redis-server"
    }
}

impl Redis {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// With `requirepass` when `password` is given.
    pub fn start_with(password: Option<&str>) -> Self {
        let mut redis = Redis {
            child: None,
            addr: SocketAddr::new(unique_loopback(), 6379),
            password: password.map(str::to_owned),
            dir: TempDir::new(),
        };
        redis.resume();
        redis
    }

    /// An address in the same range where nothing listens.
    pub fn nowhere() -> SocketAddr {
        SocketAddr::new(unique_loopback(), 6379)
    }

    pub fn ip(&self) -> IpAddr {
        self.addr.ip()
    }

    /// `redis://ip:port/0`, without the password.
    pub fn dsn(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Starts the server (again) on its address and waits until it answers.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "redis-server already running");
        let mut cmd = Command::new(binary());
        cmd.args(["--bind", &self.addr.ip().to_string()])
            .args(["--port", &self.addr.port().to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null());
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        self.child = Some(
            cmd.spawn()
                .expect("start redis-server (Debian package redis-server)"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = self.connection()
                && redis::cmd("PING").query::<String>(&mut c).is_ok()
            {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not answer");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server; its address stays free for `resume`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&self.addr, Duration::from_millis(100)).is_ok() {
            assert!(Instant::now() < deadline, "redis-server still answers");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn connection(&self) -> redis::RedisResult<redis::Connection> {
        let mut url = format!("redis://{}/0", self.addr);
        if let Some(p) = &self.password {
            url = format!("redis://:{p}@{}/0", self.addr);
        }
        redis::Client::open(url)?.get_connection_with_timeout(Duration::from_secs(2))
    }

    /// The list at `key`, newest first, as stored.
    pub fn list(&self, key: &str) -> Vec<String> {
        let mut c = self.connection().expect("connect to redis");
        redis::cmd("LRANGE")
            .arg(key)
            .arg(0)
            .arg(-1)
            .query(&mut c)
            .expect("LRANGE")
    }

    pub fn push(&self, key: &str, value: &str) {
        let mut c = self.connection().expect("connect to redis");
        redis::cmd("LPUSH")
            .arg(key)
            .arg(value)
            .query::<i64>(&mut c)
            .expect("LPUSH");
    }

    pub fn len(&self, key: &str) -> usize {
        let mut c = self.connection().expect("connect to redis");
        redis::cmd("LLEN").arg(key).query(&mut c).expect("LLEN")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
