"""uballoon's guest agent: a balloon of real, pinned pages, driven by the host.

Modules, each owning one thing:

* ``pool``    -- the balloon's memory: chunk files on a private tmpfs, pinned, their frames;
* ``holder``  -- the detached process that keeps the long-term pins alive across crashes;
* ``agent``   -- the core: chunk states, the session with the host, what to do next (pure);
* ``guard``   -- the floor and the pressure response (pure);
* ``stats``   -- memory statistics as virtio's stats tags, RAM layout;
* ``service`` -- the trio service driving the core (the only module with trio);
* ``cli``     -- ``uballoon-guest``.
"""
