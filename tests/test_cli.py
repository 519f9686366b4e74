import subprocess
import sys

import pytest

from prism_lightning.cli import main


def test_help_lists_the_commands(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "bootstrap", "chat", "assets", "evaluate", "study"):
        assert f"  {command} " in out
    assert "report" in out


def test_module_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "prism_lightning", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "commands:" in result.stdout


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train-everything"])
    assert info.value.code == 2
    assert "Unknown command" in capsys.readouterr().err


def test_chat_puts_the_persona_in_the_prompt_and_prints_the_answer(tiny_model_dir, capsys, monkeypatch):
    import prism_lightning.engines.hf as hf_engine
    from prism_lightning.contexts import ContextLibrary

    seen = []
    real = hf_engine.generate_batch

    def spy(model, tokenizer, prompts, sampling, **kw):
        seen.extend(prompts)
        return real(model, tokenizer, prompts, sampling, **kw)

    monkeypatch.setattr(hf_engine, "generate_batch", spy)  # the hf engine's stream decodes a plain model
    with pytest.raises(SystemExit) as info:
        main(
            [
                "chat",
                "--model",
                str(tiny_model_dir),
                "--persona",
                "math",
                "--max_new_tokens",
                "4",
                "What is 12*7?",
            ]
        )
    assert info.value.code == 0
    persona = ContextLibrary.builtin().get("math").text("short")
    assert len(seen) == 1 and f"system\n{persona}" in seen[0] and "What is 12*7?" in seen[0]
    printed = capsys.readouterr().out.strip()
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(tokenizer(printed, add_special_tokens=False).input_ids) <= 4 + 1


def test_chat_unknown_persona_is_one_clear_line(tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as info:
        main(["chat", "--model", str(tiny_model_dir), "--persona", "mathematics", "hi"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown context 'mathematics'" in err.lower()
    assert "Traceback" not in err


def test_chat_wrong_model_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["chat", "--model", str(tmp_path / "missing"), "hi"])
    assert info.value.code == 2
    assert "Cannot load model" in capsys.readouterr().err
