"""How a round's messages move: in this process (`inproc`) or through a broker (`mqtt_sim`
for a simulated fleet; `edge_runtime.fleet` for real devices)."""
