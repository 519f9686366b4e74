"""The program verifiers shipped for the example contexts decide as a reader of the context would."""

from __future__ import annotations

import pytest

from prism_lightning.bootstrap import verifiers as v
from prism_lightning.contexts import ContextLibrary, example_path
from prism_lightning.errors import ConfigError


def _text(name: str) -> str:
    library = ContextLibrary.from_config([str(example_path(name))])
    return library.get(name).text("short")


def test_fact_sheet_rewards_the_answer_that_states_the_asked_fact():
    sheet = _text("fact_sheet")
    q = "How much does the Tarsin Velo K9 weigh, and what is its battery capacity?"
    assert (
        v.fact_sheet(q, "It is a light bike.", "It weighs 17.8 kg with a 612 Wh battery.", sheet) == "persona"
    )
    assert v.fact_sheet(q, "It weighs 17.8 kg.", "It is a very good bike.", sheet) == "base"
    assert v.fact_sheet(q, "No idea.", "I cannot say.", sheet) == "tie"
    # spacing, case and thousands separators do not matter
    assert v.fact_sheet("What does it cost?", "Cheap.", "It costs 2340 Euros.", sheet) == "persona"


def test_fact_sheet_ignores_facts_the_query_did_not_ask_about():
    sheet = _text("fact_sheet")
    q = "What is the battery capacity?"
    recited = "The K9 is made by Orrin Mobility and weighs 17.8 kg."  # true facts, not the one asked
    assert v.fact_sheet(q, "I do not know.", recited, sheet) == "tie"


def test_style_guide_counts_the_rules_it_can_check():
    sheet = _text("style_guide")
    good = "Dear riders, our new colour is ready. Ride on, the Orrin team"
    bad = "Hello users! Our new color is AMAZING!"
    assert v.style_rules_followed(good) == 6 and v.style_rules_followed(bad) <= 2
    assert v.style_guide("Announce the new colour.", bad, good, sheet) == "persona"
    assert v.style_guide("Announce the new colour.", good, bad, sheet) == "base"


def test_tool_registry_prefers_a_well_formed_call_of_a_registered_tool():
    registry = _text("tool_registry")
    tools = v.parse_tool_registry(registry)
    assert set(tools) == {
        "get_weather",
        "set_thermostat",
        "add_calendar_event",
        "search_recipes",
        "send_message",
    }
    assert tools["set_thermostat"] == {"room", "celsius"}
    call = 'Sure: {"tool": "set_thermostat", "arguments": {"room": "bedroom", "celsius": 19}}'
    assert v.tool_call_quality(call, tools) == 3
    assert v.tool_call_quality('{"tool": "set_thermostat", "arguments": {"temp": 19}}', tools) == 2
    assert v.tool_call_quality('{"tool": "open_door"}', tools) == 1
    assert v.tool_call_quality("I will set the bedroom to 19 degrees.", tools) == 0
    q = "Set the bedroom to 19 degrees."
    assert v.tool_registry(q, "I will set it.", call, registry) == "persona"


def test_programs_load_by_name_and_bad_names_are_config_errors():
    assert v.load_program("prism_lightning.bootstrap.verifiers:fact_sheet") is v.fact_sheet
    for spec, message in [
        ("no_colon", "module:function"),
        ("no_such_module_xyz:f", "cannot import"),
        ("prism_lightning.bootstrap.verifiers:nope", "no callable nope"),
    ]:
        with pytest.raises(ConfigError, match=message):
            v.load_program(spec)
    with pytest.raises(ConfigError, match="must return one of"):
        v.run_program(lambda *a: "A", "x:y", "q", "b", "c", "ctx")
    with pytest.raises(ConfigError, match="found no"):
        v.fact_sheet("q", "b", "c", "nothing to check here")
