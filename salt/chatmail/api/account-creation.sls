{#- The account-creation switch: doveauth refuses new accounts while paths.nocreate
    exists. That path is a symlink into api.account_creation_dir, owned by the API user
    and the only path its unit may write (ReadWritePaths), so the API toggles creation by
    creating or removing the link's target; it never needs write access to /etc. An
    operator's `touch /etc/chatmail-nocreate` still works (it creates the target through
    the link). A plain file found at paths.nocreate is moved behind the link, keeping it
    closed. With api.account_creation_pin set, chatmail.chatmaild owns the path instead
    and the API answers 409 to changes. #}
{%- from "chatmail/map.jinja" import chatmail with context %}
{%- from "chatmail/api/common.jinja" import pinned with context %}
{%- set api = chatmail.api %}
{%- set nocreate = chatmail.paths.nocreate %}

include:
  - chatmail.users

chatmail-api-account-creation-dir:
  file.directory:
    - name: {{ api.account_creation_dir }}
    - user: {{ chatmail.users.api }}
    - group: {{ chatmail.users.api_group }}
    - mode: "0755"
    - makedirs: True
    - require:
      - user: chatmail-users-api
{%- if not pinned %}

{#- No link but a target: the operator removed /etc/chatmail-nocreate (the link) to
    allow account creation again; keep it that way when the link comes back. Checked
    before a plain file is moved behind the link: afterwards the path is empty too. #}
chatmail-api-nocreate-removed:
  file.absent:
    - name: {{ api.account_creation_dir }}/nocreate
    - onlyif: test ! -e {{ nocreate }} -a ! -L {{ nocreate }}
    - require:
      - file: chatmail-api-account-creation-dir

chatmail-api-nocreate-adopt:
  cmd.run:
    - name: mv -f {{ nocreate }} {{ api.account_creation_dir }}/nocreate
    - onlyif: test -e {{ nocreate }} -a ! -L {{ nocreate }}
    - require:
      - file: chatmail-api-nocreate-removed

chatmail-api-nocreate-link:
  file.symlink:
    - name: {{ nocreate }}
    - target: {{ api.account_creation_dir }}/nocreate
    - require:
      - cmd: chatmail-api-nocreate-adopt
      - file: chatmail-api-nocreate-removed
{%- endif %}
