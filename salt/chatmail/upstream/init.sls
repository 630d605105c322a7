{#- Taking over a relay that upstream's cmdeploy deployed (README: "Switching from
    cmdeploy"). What upstream stored is kept where it is, since this formula uses the
    same places: mailboxes, password hashes and markers (/home/vmail/mail/<domain>),
    chatmail.ini's path, the DKIM key (/etc/dkimkeys, selector opendkim), the TLS state
    (/var/lib/acme, /etc/ssl/.../mailserver.*, or the external files), the Postfix queue
    and /etc/chatmail-nocreate (the api state moves it behind its symlink).

    What goes: upstream's daemons and files this formula does not run, every one named in
    leftovers.yaml. Each state acts only where the thing exists, so on any other relay
    this is a no-op and a dry run shows nothing pending. #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- import_yaml "chatmail/upstream/leftovers.yaml" as leftovers %}
{%- set units = chatmail.paths.systemd_units %}
{%- set venv = chatmail.paths.venv %}

{%- if chatmail.init == "systemd" %}

include:
  - chatmail.chatmaild

{#- Upstream's venv is at our venv's path, with its own distribution (chatmaild 0.3) and
    console scripts: installing ours over it would leave upstream's modules and scripts
    behind. It goes, and the chatmaild state builds ours; the daemons restart on it. #}
chatmail-upstream-venv:
  file.absent:
    - name: {{ venv }}
    - onlyif: ls -d {{ venv }}/lib/python3*/site-packages/chatmaild-*.dist-info
    - require_in:
      - cmd: chatmail-chatmaild-venv-create
{%- for unit in leftovers.units %}

chatmail-upstream-unit-{{ unit }}:
  service.dead:
    - name: {{ unit }}
    - enable: False
    - onlyif: test -e {{ units }}/{{ unit }}
  file.absent:
    - name: {{ units }}/{{ unit }}
    - require:
      - service: chatmail-upstream-unit-{{ unit }}
    - onchanges_in:
      - module: chatmail-upstream-units-reload
{%- endfor %}
{%- for path in leftovers.paths %}

chatmail-upstream-path-{{ path }}:
  file.absent:
    - name: {{ path }}
{%-   if path.startswith(units ~ "/") %}
    - onchanges_in:
      - module: chatmail-upstream-units-reload
{%-   endif %}
{%- endfor %}

chatmail-upstream-units-reload:
  module.run:
    - service.systemctl_reload: []

chatmail-upstream-packages:
  pkg.purged:
    - pkgs: {{ leftovers.packages | json }}
{%- endif %}
