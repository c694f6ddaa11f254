"""The demo: a toy world the whole loop can be run and measured in, on its own.

Everything here is the demo's, not the product's: the synthetic chats of the tiny base
model's five domains and two styles, the simulated population that talks to the gateway,
the evaluation suites that know its styles and its rare skill, the driver of `feedloop demo`
and its report. It sits on top of every layer and may import any of them; nothing in app/,
streams/, learners/, trainer/ or migrations/ imports it, except the CLI commands that run
it (`feedloop demo`, `feedloop model init`), lazily. The trainer meets it only through its
seams: the chats a base model is built from, and the evaluation suites plugged into the gate.
"""
