//! The simulated network: connections, delivery in order, loss and partitions, dialing.

use super::*;

impl Sim {
    // ---- network ----

    pub(super) fn cut(&self, dev: usize, dir: usize) -> bool {
        let d = &self.devs[dev];
        d.offline_until > self.now || d.partition_until[dir] > self.now
    }

    /// Marks `dirs` of `conn` lost; both ends notice after a detection timeout (the device's
    /// only if `device_detects`, otherwise the caller tells it).
    pub(super) fn kill_conn(&mut self, conn: ConnId, dirs: [usize; 2], device_detects: bool) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        for d in dirs {
            c.lost[d] = true;
        }
        if c.doomed {
            return;
        }
        c.doomed = true;
        self.report.broken_connections += 1;
        let dev_at = self.now + self.rng.gen_range(2 * SEC..20 * SEC);
        let relay_at = self.now + self.rng.gen_range(2 * SEC..20 * SEC);
        if device_detects {
            self.schedule(dev_at, Ev::DeviceLost { conn });
        }
        self.schedule(relay_at, Ev::RelayLost { conn });
    }

    pub(super) fn transmit(&mut self, conn: ConnId, dir: usize, ev: Ev) {
        let Some(c) = self.conns.get(&conn) else { return };
        if c.lost[dir] {
            return;
        }
        let dev = c.dev;
        let lose = self.cut(dev, dir) || (self.faults && self.cfg.loss > 0.0 && self.rng.gen_bool(self.cfg.loss));
        if lose {
            self.report.lost_frames += 1;
            self.kill_conn(conn, [dir, dir], true);
            return;
        }
        let latency = self.devs[dev].latency + self.rng.gen_range(0..=self.devs[dev].latency);
        let c = self.conns.get_mut(&conn).expect("checked");
        let at = (self.now + latency).max(c.floor[dir]);
        c.floor[dir] = at;
        self.schedule(at, ev);
    }

    /// The device's dial arrives: a connection, or (relay down, device cut off) a failure
    /// after a while.
    pub(super) fn connect(&mut self, dev: usize) -> Check {
        if self.devs[dev].gone || self.devs[dev].device.is_none() || self.devs[dev].conn.is_some() {
            return Ok(());
        }
        if self.relay.core.is_none() || self.cut(dev, C2R) || self.cut(dev, R2C) {
            // A failed dial takes a while to fail (refused: a round trip; no route: a timeout).
            let fail_after = self.rng.gen_range(self.devs[dev].latency * 2..=SEC);
            let life = self.devs[dev].life;
            self.schedule(self.now + fail_after, Ev::ConnectFailed { dev, life });
            return Ok(());
        }
        let conn = self.open_conn(dev);
        self.devs[dev].conn = Some(conn);
        self.device_input(dev, SessionInput::Connected)
    }

    /// A frame from the relay reaches the device (if it still has that connection).
    pub(super) fn device_frame(&mut self, dev: usize, conn: ConnId, frame: RelayFrame) -> Check {
        if self.conns[&conn].dev_open && self.devs[dev].conn == Some(conn) {
            self.observe_relay_frame(dev, &frame)?;
            self.device_input(dev, SessionInput::Frame(Box::new(frame)))?;
        }
        Ok(())
    }

    /// Frames from the relay that reach the device together: its session core takes them in
    /// order, then the device carries out all their outputs at once (`Device::session_steps`).
    pub(super) fn device_frames(&mut self, dev: usize, conn: ConnId, frames: Vec<RelayFrame>) -> Check {
        if !(self.conns[&conn].dev_open && self.devs[dev].conn == Some(conn)) {
            return Ok(());
        }
        let now_ms = self.now / MS;
        let (mut work, mut outputs) = (Vec::new(), Vec::new());
        for frame in frames {
            self.observe_relay_frame(dev, &frame)?;
            let Some(core) = self.devs[dev].core.as_mut() else { return Ok(()) };
            let (w, o) = core.handle(now_ms, SessionInput::Frame(Box::new(frame)));
            work.extend(w);
            outputs.extend(o);
        }
        self.run_work(dev, work)?;
        self.device_outputs(dev, outputs)
    }

    /// The device notices its connection is gone (a reset, or its own timeout).
    pub(super) fn device_lost(&mut self, conn: ConnId) -> Check {
        let Some(c) = self.conns.get_mut(&conn) else { return Ok(()) };
        c.dev_open = false;
        let dev = c.dev;
        if self.devs[dev].conn == Some(conn) {
            self.devs[dev].conn = None;
            self.device_input(dev, SessionInput::Lost("the connection broke".into()))?;
        }
        Ok(())
    }

    /// The device drops its connection ([`Work::Close`]): nothing more goes either way; the
    /// relay notices by the reset, or by its own timeout if the path is cut.
    pub(super) fn drop_conn(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        c.dev_open = false;
        c.lost = [true; 2];
        if !c.doomed {
            c.doomed = true;
            let dev = c.dev;
            let at = match self.cut(dev, C2R) {
                true => self.now + self.rng.gen_range(2 * SEC..20 * SEC),
                false => self.now + self.devs[dev].latency,
            };
            self.schedule(at, Ev::RelayLost { conn });
        }
    }

    pub(super) fn relay_lost(&mut self, conn: ConnId) -> Check {
        let Some(c) = self.conns.get_mut(&conn) else { return Ok(()) };
        if c.relay_open && c.epoch == self.relay.epoch {
            c.relay_open = false;
            if let Some(core) = self.relay.core.as_mut() {
                let effects = core.handle(Input::Closed { conn });
                self.relay_effects(effects)?;
            }
        }
        Ok(())
    }
}
